"""Resumable training checkpoints with Orbax: one ``CheckpointManager`` step folder holds

- ``state``: the train state pytree (adapter params, optimizer state, step, RNG key data), each array saved
  and restored in its sharding (restore takes an abstract tree carrying the target shardings);
- ``data``: the Grain iterator state (one small JSON per process);
- ``config``: JSON record of the run (its config and the adapter spec), to resume and to export later.

Saves are asynchronous by default; ``keep`` bounds how many step folders stay. A step folder appears only
once complete, so a run killed during a save resumes from the previous one. Every failure to write surfaces in
the calling thread as a ``CheckpointError`` (the folder is probed before each save, so an unwritable or full disk
stops the run at once instead of inside Orbax's background threads), and a damaged step is moved aside
(``<step>.damaged``, never deleted) by ``restore_newest`` in favour of the newest readable one.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ipadapter_jax.data.pipeline import iterator_restore_args, iterator_save_args
from ipadapter_jax.errors import CheckpointError

ITEMS = ("state", "data", "config")
T = TypeVar("T")


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct``s (with shardings) of a live pytree: the target of a sharded restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def probe_writable(folder: Path) -> None:
    """Create a folder and a small file in ``folder`` and remove them (what a checkpoint save does first)."""
    probe = folder / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir(parents=True)
        (probe / "probe").write_bytes(b"\0" * 4096)
    finally:
        if probe.exists():
            for child in probe.iterdir():
                child.unlink()
            probe.rmdir()


def _reason(error: BaseException) -> str:
    """The error's type and the first line of its message (Orbax's can run to pages)."""
    text = next(iter(str(error).strip().splitlines()), "")
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Checkpointer:
    """Save/restore of train state + data iterator + config under ``directory`` (every ``every_steps``)."""

    def __init__(self, directory: str | Path, *, every_steps: int, keep: int, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.every_steps = max(every_steps, 1)
        self._keep, self._async, self._read_only = keep, async_save, read_only
        if not read_only:
            self._probe()
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        # The interval is decided here (Orbax's own policy also saves the first step of a run). A read-only
        # checkpointer (export) neither creates the folder nor starts Orbax's background tmp-folder cleanup.
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if self._read_only else 1, max_to_keep=self._keep if self._keep > 0 else None,
            create=not self._read_only, enable_async_checkpointing=self._async,
            cleanup_tmp_directories=not self._read_only, read_only=self._read_only)
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        if self._read_only:  # Orbax warns that the folder is read only, which is what was asked for
            absl_logger.setLevel(logging.ERROR)
        try:
            return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        except OSError as e:
            raise CheckpointError(f"Cannot open the checkpoint folder {self.directory} ({_reason(e)}); fix its "
                                  "permissions or free space, or choose another workdir.") from None
        finally:
            absl_logger.setLevel(level)

    def _probe(self) -> None:
        try:
            probe_writable(self.directory)
        except OSError as e:
            raise CheckpointError(f"Cannot write checkpoints to {self.directory} ({_reason(e)}); free space or fix "
                                  "its permissions, then rerun the same command to resume.") from None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether ``save(step, ...)`` writes a checkpoint."""
        return step % self.every_steps == 0

    def save(self, step: int, state: Any, iterator, record: dict[str, Any], *, force: bool = False) -> bool:
        """Save if ``step`` is a multiple of ``every_steps`` (or ``force``); returns whether a save started.
        A failure of this save or of the previous (asynchronous) one raises ``CheckpointError``."""
        if not (force or self.due(step)):
            return False
        self._probe()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=iterator_save_args(iterator),
                                  config=ocp.args.JsonSave(record))
        try:
            return self._manager.save(step, args=args, force=True)
        except Exception as e:  # Orbax re-raises its background thread's error, of any type
            raise self._write_error(step, e) from None

    def _write_error(self, step: int, error: BaseException) -> CheckpointError:
        return CheckpointError(f"Writing the checkpoint of step {step} to {self.directory} failed ({_reason(error)});"
                               " free space or fix its permissions, then rerun the same command to resume from the "
                               "last complete checkpoint.")

    def restore(self, step: int, abstract_state: Any, iterator) -> Any:
        """The state placed as ``abstract_state`` says; ``iterator`` is restored in place."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=iterator_restore_args(iterator))
        return self._restore(step, args)["state"]

    def read_record(self, step: int | None = None) -> dict[str, Any]:
        """The saved config record of ``step`` (default: the latest), without touching the state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}; train first or pass another workdir.")
        return self._restore(step, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore_state_locally(self, step: int) -> Any:
        """Only the train state, every array on this process's first device whatever mesh saved it: exporting
        an adapter trained on a pod works on a laptop."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        try:
            saved = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state").item_metadata
        except Exception as e:  # a damaged step folder fails in many ways inside Orbax
            raise self._read_error(step, e) from None
        if saved is None or saved.tree is None:
            raise self._read_error(step, "the state's metadata is missing")
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved.tree)
        return self._restore(step, ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    def _restore(self, step: int, args) -> Any:
        try:
            return self._manager.restore(step, args=args)
        except Exception as e:  # a damaged step folder fails in many ways inside Orbax
            raise self._read_error(step, e) from None

    def _read_error(self, step: int, error: BaseException | str) -> CheckpointError:
        reason = error if isinstance(error, str) else _reason(error)
        return CheckpointError(f"Checkpoint {self.directory}/{step} cannot be read ({reason}); it is damaged "
                               "or incomplete.")

    def restore_newest(self, load: Callable[[int], T], *, on_damaged: Callable[[int, str], None] | None = None
                       ) -> tuple[int, T] | None:
        """``(step, load(step))`` for the newest step that ``load`` reads without a ``CheckpointError``; each
        damaged newer step is reported to ``on_damaged(step, reason)`` and, unless read-only, moved aside to
        ``<step>.damaged-<id>`` (kept, so nothing is lost) so that training can save that step again. None when
        there is no checkpoint; a ``CheckpointError`` naming every step when none is readable."""
        failures = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, load(step)
            except CheckpointError as e:
                failures.append(str(e))
                if on_damaged is not None:
                    on_damaged(step, str(e))
                if not self._read_only:
                    self._set_aside(step)
        if failures:
            raise CheckpointError(f"No readable checkpoint in {self.directory}: {' '.join(failures)} Restore the "
                                  "folder from a backup or start again in a new workdir.")
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            source = self.directory / str(step)
            if source.exists():
                os.replace(source, self.directory / f"{step}.damaged-{uuid.uuid4().hex[:8]}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ipadapter_jax set aside checkpoint {step}")
        self._manager.close()
        self._manager = self._open()

    def reached_preemption(self, step: int) -> bool:
        """Whether the platform announced a preemption (e.g. TPU maintenance); all processes agree."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until the last save is on disk; its failure raises ``CheckpointError``."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # Orbax re-raises its background thread's error, of any type
            raise self._write_error(self.latest_step() or 0, e) from None

    def close_quietly(self) -> None:
        """Close after another error: wait for a save in flight and end Orbax's threads, ignoring their failure."""
        try:
            self._manager.close()
        except Exception:  # noqa: BLE001 (the caller is already raising the error that matters)
            pass

    def close(self) -> None:
        try:
            self._manager.close()
        except Exception as e:  # closing waits for the last save
            raise self._write_error(self.latest_step() or 0, e) from None
