"""Resumable training checkpoints with Orbax: one ``CheckpointManager`` step folder holds

- ``state``: the train state pytree (adapter params, optimizer state, step, RNG key data), each array saved
  and restored in its sharding (restore takes an abstract tree carrying the target shardings);
- ``data``: the Grain iterator state (one small JSON per process);
- ``config``: JSON record of the run (its config and the adapter spec), to resume and to export later.

Saves are asynchronous by default; ``keep`` bounds how many step folders stay. A step folder appears only
once complete, so a run killed during a save resumes from the previous one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ipadapter_jax.data.pipeline import iterator_restore_args, iterator_save_args
from ipadapter_jax.errors import CheckpointError

ITEMS = ("state", "data", "config")


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct``s (with shardings) of a live pytree: the target of a sharded restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Save/restore of train state + data iterator + config under ``directory`` (every ``every_steps``)."""

    def __init__(self, directory: str | Path, *, every_steps: int, keep: int, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.every_steps = max(every_steps, 1)
        # The interval is decided here (Orbax's own policy also saves the first step of a run). A read-only
        # checkpointer (export) neither creates the folder nor starts Orbax's background tmp-folder cleanup.
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else 1, max_to_keep=keep if keep > 0 else None,
            create=not read_only, enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
            read_only=read_only)
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        if read_only:  # Orbax warns that the folder is read only, which is what was asked for
            absl_logger.setLevel(logging.ERROR)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        finally:
            absl_logger.setLevel(level)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, iterator, record: dict[str, Any], *, force: bool = False) -> bool:
        """Save if ``step`` is a multiple of ``every_steps`` (or ``force``); returns whether a save started."""
        if not force and step % self.every_steps:
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=iterator_save_args(iterator),
                                  config=ocp.args.JsonSave(record))
        return self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any, iterator) -> Any:
        """The state placed as ``abstract_state`` says; ``iterator`` is restored in place."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=iterator_restore_args(iterator))
        return self._restore(step, args, "resume with the config it was written with, or use a new workdir")["state"]

    def read_record(self, step: int | None = None) -> dict[str, Any]:
        """The saved config record of ``step`` (default: the latest), without touching the state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}; train first or pass another workdir.")
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore_state_locally(self, step: int) -> Any:
        """Only the train state, every array on this process's first device whatever mesh saved it: exporting
        an adapter trained on a pod works on a laptop."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state").item_metadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved.tree)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        return self._restore(step, args, "the checkpoint may be incomplete; try another step")["state"]

    def _restore(self, step: int, args, fix: str) -> Any:
        try:
            return self._manager.restore(step, args=args)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"Checkpoint {self.directory}/{step} cannot be restored ({e}); {fix}.") from None

    def reached_preemption(self, step: int) -> bool:
        """Whether the platform announced a preemption (e.g. TPU maintenance); all processes agree."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
