"""Scheduler names, diffusers class names, and loading a `scheduler_config.json`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.schedulers.common import Scheduler
from ipadapter_jax.schedulers.ddim import DDIM
from ipadapter_jax.schedulers.dpm import DPMSolverMultistep
from ipadapter_jax.schedulers.euler import EulerAncestral, EulerDiscrete
from ipadapter_jax.schedulers.lcm import LCM
from ipadapter_jax.schedulers.pndm import PNDM

# name -> (sampler, config fields the name implies over whatever the base config says)
SCHEDULERS: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "ddim": (DDIM, {}),
    "pndm": (PNDM, {}),
    "euler": (EulerDiscrete, {}),
    "euler_ancestral": (EulerAncestral, {}),
    "dpmpp_2m": (
        DPMSolverMultistep,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": (
        DPMSolverMultistep,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": (LCM, {}),
}
_BY_CLASS: dict[str, type[Scheduler]] = {
    cls.class_name: cls for cls in (DDIM, PNDM, EulerDiscrete, EulerAncestral, DPMSolverMultistep, LCM)
}


def make_scheduler(name: str | None, config: Mapping[str, Any]) -> Scheduler:
    """A sampler from a diffusers scheduler config; `name` (a key of SCHEDULERS) overrides `_class_name`.

    Like diffusers' `from_config`, any scheduler's config is a valid base: fields the chosen sampler does
    not know are ignored, and the ones it knows but the config lacks take that sampler's defaults.
    """
    if name is None:
        class_name = config.get("_class_name")
        if class_name not in _BY_CLASS:
            raise ConfigError(
                f"Scheduler class {class_name!r} is not supported; supported: {', '.join(_BY_CLASS)}. "
                f"Pass a scheduler name ({', '.join(SCHEDULERS)}) to use this config as its base."
            )
        return _BY_CLASS[class_name](config)
    if name not in SCHEDULERS:
        raise ConfigError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    cls, implied = SCHEDULERS[name]
    return cls({**config, **implied})


def load_scheduler(path: str | Path, name: str | None = None) -> Scheduler:
    """Read `scheduler_config.json` (the file, its folder, or a model folder with `scheduler/`)."""
    path = Path(path)
    candidates = (
        [path]
        if path.suffix == ".json"
        else [path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"]
    )
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ConfigError(f"No scheduler config at {' or '.join(map(str, candidates))}.")
    try:
        config = json.loads(found.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"Scheduler config {found} is not readable JSON ({err}).") from err
    if not isinstance(config, dict):
        raise ConfigError(f"Scheduler config {found} is not a JSON object.")
    return make_scheduler(name, config)
