"""The Pallas kernel calls of a traced program, read from its jaxpr (nested jaxprs included): each call's name
and the head layout its metadata records ("rows", "lanes" or "tokens"; models/pallas_*.py)."""

from __future__ import annotations

import jax


def kernel_calls(jaxpr) -> list[tuple[str, str]]:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append((eqn.params["name"], dict(eqn.params.get("metadata") or {}).get("layout")))
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += kernel_calls(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += kernel_calls(sub)
    return found
