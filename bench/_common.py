"""Shared benchmark setup: put the repository on sys.path and apply the CLI's XLA:CPU flags."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def configure_xla_for_cpu() -> None:
    from ipadapter_jax.xla_flags import configure_xla_for_cpu as configure

    configure()
