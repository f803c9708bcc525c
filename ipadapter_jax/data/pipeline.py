"""The Grain training input pipeline: per-process shard, seeded per-epoch shuffle, transform, batch.

Order of operations (all index arithmetic, so the iterator state is a few integers):

1. ``range(N')`` where N' drops the last ``N % shard_count`` records, so every process has as many;
2. a global shuffle, reseeded each epoch, repeated ``num_epochs`` times (None: forever);
3. this process's slice ``[shard_index::shard_count]``: disjoint across processes within every epoch;
4. read + :class:`~ipadapter_jax.data.transforms.TrainTransform` in ``read_threads`` threads;
5. drop and count broken records, batch ``global_batch_size // shard_count`` with ``drop_remainder``;
6. optionally in ``worker_count`` processes (``mp_prefetch``; the script needs an
   ``if __name__ == "__main__":`` guard, workers are spawned).

Skipped records: every batch is built after the broken records before it were dropped;
:attr:`TrainIterator.num_skipped` is the running total for this process (part of the checkpointed
state), and each skipped record is logged (the first few per worker) with its index and reason.
A restored iterator must use the same source, transform, seed, batch size, shard and worker counts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import jax
import numpy as np

from ipadapter_jax.data.sources import SkipRecord
from ipadapter_jax.data.transforms import TrainTransform, TransformConfig
from ipadapter_jax.errors import ConfigError, UserError

_log = logging.getLogger(__name__)
_SKIPPED = "_num_skipped"  # per-element count of broken records dropped just before it; summed and removed
_MAX_LOGGED = 10


class _WithEpoch:
    """(position in the repeated dataset, record id) -> (epoch, record id)."""

    def __init__(self, epoch_length: int):
        self.epoch_length = epoch_length

    def __call__(self, position: int, record_index: int) -> tuple[int, int]:
        return position // self.epoch_length, int(record_index)


class _Skipped:
    __slots__ = ("record_index", "reason")

    def __init__(self, record_index: int, reason: str):
        self.record_index = record_index
        self.reason = reason


class _ReadAndTransform:
    """(epoch, record id) -> example dict, or a _Skipped marker for a broken record."""

    def __init__(self, source, transform: TrainTransform):
        self.source = source
        self.transform = transform

    def __call__(self, epoch_and_index: tuple[int, int]):
        epoch, index = epoch_and_index
        try:
            return self.transform(self.source[index], index, epoch)
        except SkipRecord as skip:
            return _Skipped(index, skip.reason)


class _DropSkipped(grain.IterDataset):
    """Drops _Skipped markers, noting on the next good element how many were dropped before it."""

    def __iter__(self):
        return _DropSkippedIterator(self._parent.__iter__())


class _DropSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)
        self._logged = 0

    def __next__(self):
        skipped = 0
        while True:
            element = next(self._parent)
            if not isinstance(element, _Skipped):
                element[_SKIPPED] = np.int32(skipped)
                return element
            skipped += 1
            if self._logged < _MAX_LOGGED:
                self._logged += 1
                _log.warning("Skipping record %d: %s.", element.record_index, element.reason)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class TrainIterator(grain.DatasetIterator):
    """The batch iterator: checkpointable; ``num_skipped``: broken records this process skipped so far."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.num_skipped = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        self.num_skipped += int(batch.pop(_SKIPPED).sum())
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "num_skipped": self.num_skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.num_skipped = int(state["num_skipped"])


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    """How shuffled records become this process's batches. Shard defaults: ``jax.process_index()`` /
    ``jax.process_count()``; ``num_epochs`` None repeats forever; ``worker_count`` > 0 transforms in Grain worker
    processes; ``read_buffer_size`` None prefetches max(16, 2 local batches)."""

    global_batch_size: int
    seed: int
    shard_index: int | None = None
    shard_count: int | None = None
    num_epochs: int | None = None
    shuffle: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 8
    read_buffer_size: int | None = None


def make_train_dataset(source, transform_config: TransformConfig, options: BatchOptions) -> grain.IterDataset:
    """The batched Grain ``IterDataset`` behind :func:`make_train_iterator` (same arguments)."""
    transform = TrainTransform(transform_config, options.seed)
    transform.load()  # fail here, not in a worker
    return batched_dataset(source, transform, options)


def batched_dataset(source, transform, options: BatchOptions) -> grain.IterDataset:
    """Seeded global shuffle, per-process shards, ``transform(record, record_index, epoch)`` per record (raising
    ``SkipRecord`` skips and counts it), local batches; the order depends only on the seed and the shard."""
    o = options
    global_batch_size, seed = o.global_batch_size, o.seed
    shard_index = jax.process_index() if o.shard_index is None else o.shard_index
    shard_count = jax.process_count() if o.shard_count is None else o.shard_count
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index {shard_index} must lie in [0, shard_count={shard_count}).")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ConfigError(f"global_batch_size {global_batch_size} must be a positive multiple of the "
                          f"{shard_count} processes.")
    if seed < 0 or seed >= 2**32:
        raise ConfigError(f"seed must lie in [0, 2**32), got {seed}.")
    local_batch = global_batch_size // shard_count
    usable = len(source) - len(source) % shard_count
    if usable == 0:
        raise UserError(f"{source!r} has {len(source)} records, fewer than the {shard_count} processes "
                        "reading it.")
    ds = grain.MapDataset.range(usable)
    if o.shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(o.num_epochs).map_with_index(_WithEpoch(usable))
    ds = ds[shard_index::shard_count].map(_ReadAndTransform(source, transform))
    read_options = grain.ReadOptions(num_threads=o.read_threads,
                                     prefetch_buffer_size=o.read_buffer_size or max(16, 2 * local_batch))
    it = _DropSkipped(ds.to_iter_dataset(read_options)).batch(local_batch, drop_remainder=True)
    if o.worker_count > 0:
        _mark_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=o.worker_count,
                                                          per_worker_buffer_size=o.worker_buffer_size))
    return it


def _mark_absl_flags_parsed() -> None:
    # Grain reads its absl flags when it starts workers; a program not run through absl.app never parses them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(source, transform_config: TransformConfig, options: BatchOptions) -> TrainIterator:
    """Batches of ``global_batch_size // shard_count`` transformed records for this process (see module doc).

    ``source`` is any random-access sequence of records (e.g. ``reader.open_source(...)``). Batches are dicts
    of numpy arrays with a leading batch axis; see ``transforms`` for the keys.
    """
    return TrainIterator(iter(make_train_dataset(source, transform_config, options)))


def to_global_batch(local_batch: dict[str, np.ndarray], mesh, batch_spec) -> dict[str, Any]:
    """Global ``jax.Array``s from every process's batch, placed by ``NamedSharding(mesh, batch_spec)``.

    ``batch_spec`` names mesh axes for the leading (batch) axis only, e.g. ``P(("data", "fsdp"))``; the
    other axes are replicated. Each process's rows land on its own devices' shards of that axis.
    """
    sharding = jax.sharding.NamedSharding(mesh, batch_spec)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}


def iterator_save_args(iterator: grain.DatasetIterator):
    """Orbax ``args`` that save ``iterator``'s state (one JSON file per process), for ``args.Composite``."""
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator):
    """Orbax ``args`` that restore a saved state into ``iterator`` (made anew with the same arguments)."""
    return grain.checkpoint.CheckpointRestore(iterator)
