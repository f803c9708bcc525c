"""The Grain pipeline: sharding, shuffling, skip counting, checkpoint/restore, global arrays, workers."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ipadapter_jax.data import pipeline, transforms
from ipadapter_jax.errors import ConfigError


def _iterator(source, config, **options):
    return pipeline.make_train_iterator(source, config, pipeline.BatchOptions(**options))


@pytest.fixture(scope="module")
def config(tokenizer_dir):
    return transforms.TransformConfig(tokenizer_path=str(tokenizer_dir), resolution=16, clip_image_size=16)


def _indices(iterator, steps):
    return np.concatenate([next(iterator)["record_index"] for _ in range(steps)])


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_contract(prepared_source, config):
    it = _iterator(prepared_source, config, global_batch_size=4, seed=0, shard_index=0,
                   shard_count=1)
    batch = next(it)
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "pixel_values": (np.float32, (4, 16, 16, 3)),
        "clip_pixel_values": (np.float32, (4, 3, 16, 16)),
        "input_ids": (np.int32, (4, 77)),
        "drop_image": (np.bool_, (4,)),
        "drop_text": (np.bool_, (4,)),
        "record_index": (np.int32, (4,)),
    }
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert it.num_skipped == 0


def test_epochs_are_permutations_reshuffled_each_epoch(prepared_source, config):
    n = len(prepared_source)
    it = _iterator(prepared_source, config, global_batch_size=4, seed=3, shard_index=0,
                   shard_count=1, num_epochs=2)
    order = _indices(it, 2 * n // 4)
    with pytest.raises(StopIteration):
        next(it)
    first, second = order[:n], order[n:]
    assert sorted(first) == sorted(second) == list(range(n))
    assert (first != second).any()
    same_seed = _iterator(prepared_source, config, global_batch_size=4, seed=3,
                          shard_index=0, shard_count=1)
    np.testing.assert_array_equal(_indices(same_seed, n // 4), first)
    other_seed = _iterator(prepared_source, config, global_batch_size=4, seed=4,
                           shard_index=0, shard_count=1)
    assert (_indices(other_seed, n // 4) != first).any()


@pytest.mark.parametrize("n", [24, 23])
def test_process_shards_are_disjoint_and_cover_each_epoch(prepared_source, config, n):
    source = [prepared_source[i] for i in range(n)]
    usable = n - n % 2
    per_process = []
    for shard_index in range(2):
        it = _iterator(source, config, global_batch_size=4, seed=5,
                       shard_index=shard_index, shard_count=2, num_epochs=2)
        seen = _indices(it, usable // 2)  # two epochs, 2 records a batch
        per_process.append((seen[: usable // 2], seen[usable // 2:]))
    for epoch in range(2):
        a, b = per_process[0][epoch], per_process[1][epoch]
        assert not set(a) & set(b)
        assert sorted([*a, *b]) == list(range(usable))
    # The shuffle is global, so a process reads other records in another epoch.
    assert set(per_process[0][0]) != set(per_process[0][1])


def test_broken_records_are_skipped_and_counted(prepared_source, config):
    source = [dict(prepared_source[i]) for i in range(20)]
    source[2]["image"] = source[2]["image"][:50]
    source[5]["image"] = b"garbage"
    source[11]["text"] = ""
    it = _iterator(source, config, global_batch_size=1, seed=0, shard_index=0,
                   shard_count=1, shuffle=False)
    seen = _indices(it, 9)
    assert it.num_skipped == 2 and 5 not in seen
    state = json.loads(json.dumps(it.get_state()))
    rest = _indices(it, 8)
    assert sorted([*seen, *rest]) == sorted(set(range(20)) - {2, 5, 11})
    assert it.num_skipped == 3

    resumed = _iterator(source, config, global_batch_size=1, seed=0, shard_index=0,
                        shard_count=1, shuffle=False)
    resumed.set_state(state)
    assert resumed.num_skipped == 2
    np.testing.assert_array_equal(_indices(resumed, 8), rest)
    assert resumed.num_skipped == 3


def test_restored_iterator_yields_the_same_batches(prepared_source, config):
    options = pipeline.BatchOptions(global_batch_size=4, seed=11, shard_index=0, shard_count=1)
    it = pipeline.make_train_iterator(prepared_source, config, options)
    for _ in range(5):  # an epoch is 6 batches of 4
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]  # crosses into the second epoch

    resumed = pipeline.make_train_iterator(prepared_source, config, options)
    resumed.set_state(state)
    _assert_same_batches([next(resumed) for _ in range(4)], expected)


def test_orbax_checkpoint_of_the_iterator(prepared_source, config, tmp_path):
    import orbax.checkpoint as ocp

    options = pipeline.BatchOptions(global_batch_size=2, seed=2, shard_index=0, shard_count=1)
    it = pipeline.make_train_iterator(prepared_source, config, options)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(
            params=ocp.args.StandardSave({"w": np.arange(4.0)}),
            data_iter=pipeline.iterator_save_args(it),
        ))
        manager.wait_until_finished()
    expected = [next(it) for _ in range(3)]

    resumed = pipeline.make_train_iterator(prepared_source, config, options)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            params=ocp.args.StandardRestore({"w": np.zeros(4)}),
            data_iter=pipeline.iterator_restore_args(resumed),
        ))
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(4.0))
    assert restored["data_iter"] is resumed
    _assert_same_batches([next(resumed) for _ in range(3)], expected)


def test_to_global_batch_places_rows_on_the_data_axis():
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("data", "fsdp"))
    local = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "flag": np.arange(8) % 3 == 0}

    batch = pipeline.to_global_batch(local, mesh, P("data"))
    assert batch["x"].shape == (8, 3) and batch["x"].dtype == np.float32 and batch["flag"].dtype == np.bool_
    for i in range(4):
        for j in range(2):
            shard = next(s for s in batch["x"].addressable_shards if s.device == devices[i, j])
            # Rows 2i, 2i+1 on data index i, replicated over fsdp.
            np.testing.assert_array_equal(np.asarray(shard.data), local["x"][2 * i:2 * i + 2])
    np.testing.assert_array_equal(np.asarray(batch["flag"]), local["flag"])

    both = pipeline.to_global_batch(local, mesh, P(("data", "fsdp")))
    for i in range(4):
        for j in range(2):
            shard = next(s for s in both["x"].addressable_shards if s.device == devices[i, j])
            np.testing.assert_array_equal(np.asarray(shard.data), local["x"][2 * i + j: 2 * i + j + 1])


def test_argument_checks(prepared_source, config):
    with pytest.raises(ConfigError, match="multiple"):
        _iterator(prepared_source, config, global_batch_size=3, seed=0, shard_index=0,
                  shard_count=2)
    with pytest.raises(ConfigError, match="shard_index"):
        _iterator(prepared_source, config, global_batch_size=4, seed=0, shard_index=2,
                  shard_count=2)


def test_worker_processes(prepared_source, tokenizer_dir):
    # Workers are spawned processes; pytest's entry point already has the __main__ guard they need.
    # No CLIP input here: importing the image processor drags torch into each worker, slow on 2 cores.
    config = transforms.TransformConfig(tokenizer_path=str(tokenizer_dir), resolution=16, clip_input=False)
    options = pipeline.BatchOptions(global_batch_size=4, seed=0, shard_index=0, shard_count=1, num_epochs=1,
                                    worker_count=2, read_threads=2)
    it = pipeline.make_train_iterator(prepared_source, config, options)
    try:
        batches = [next(it), next(it)]
        state = json.loads(json.dumps(it.get_state()))
        batches += list(it)
    finally:
        it.close()
    assert len(batches) == len(prepared_source) // 4
    seen = np.concatenate([b["record_index"] for b in batches])
    assert sorted(seen) == list(range(len(prepared_source)))
    assert batches[0]["pixel_values"].shape == (4, 16, 16, 3)

    resumed = pipeline.make_train_iterator(prepared_source, config, options)
    try:
        resumed.set_state(state)
        _assert_same_batches(list(resumed), batches[2:])
    finally:
        resumed.close()
