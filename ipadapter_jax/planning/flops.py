"""Model FLOPs counted from a traced program, without compiling: matrix products and convolutions at their exact
sizes, custom (Pallas) kernels at the useful FLOPs they record in their metadata (their declared cost
otherwise), loops by their trip count. Elementwise work is left out (a few percent of a UNet's).

The planner counts a training step's gradient twice, under its remat policy and with none: the difference is the
forward work the policy recomputes, which the compiler's FLOP count includes and MFU must not (MFU counts the
model's work; recomputation is the price of memory, paid in time).
"""

from __future__ import annotations

import math

import jax
from jax.extend import core


def jaxpr_flops(jaxpr: core.Jaxpr) -> float:
    """FLOPs of one run of `jaxpr` (every nested jaxpr included; a `cond` counts its costliest branch and a
    `while` its body once)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contracting, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # every output element sums input features x kernel taps
            spec = params["dimension_numbers"].rhs_spec
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[d] for d in spec[1:])
        elif name == "pallas_call":
            metadata = dict(params.get("metadata") or {})
            estimate = params.get("cost_estimate")
            total += float(metadata.get("useful_flops", estimate.flops if estimate is not None else 0))
        elif name == "scan":
            total += params["length"] * jaxpr_flops(params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(jaxpr_flops(branch.jaxpr) for branch in params["branches"])
        elif name == "while":
            total += jaxpr_flops(params["body_jaxpr"].jaxpr)
        else:
            total += sum(jaxpr_flops(sub) for sub in _nested(params))
    return total


def _nested(params: dict) -> list[core.Jaxpr]:
    out = []
    for value in params.values():
        if isinstance(value, core.ClosedJaxpr):
            out.append(value.jaxpr)
        elif isinstance(value, core.Jaxpr):
            out.append(value)
    return out


def gradient_flops(loss, loss_args, mesh) -> float:
    """FLOPs of the gradient of `loss` in its first argument (the trainable parameters), as the training step
    takes it, for the whole batch of `loss_args` (divide by the chips for a data-parallel step's share)."""

    def gradient(params, *rest):
        return jax.grad(lambda p: loss(p, *rest)[0])(params)

    with jax.set_mesh(mesh):
        return jaxpr_flops(jax.make_jaxpr(gradient)(*loss_args).jaxpr)
