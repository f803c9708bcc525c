"""The encoder cache: one pass of the frozen VAE, text and image encoders over a dataset, stored as an
array_record TFDS dataset, so that training runs only the adapter and the UNet.

Record ``i`` of the cache is record ``i`` of the source (an unreadable source record is kept as a record
with ``valid=False`` and skipped, and counted, at training time), so a cached run shuffles, drops and draws
exactly as the uncached run with the same seed. Per record it stores the VAE posterior moments (mean and
log-variance, sampled anew every step), the text encoding (SDXL: both encoders' penultimate states and the
pooled embedding), the image features (``image_embeds`` or ``hidden_states[-2]``) and, for SDXL, the time
ids. The CFG drops are applied at training time from the record's draws, exactly as without the cache.

The crop is fixed at build time (epoch 0's draw for ``crop=random``). ``ipadapter_cache.json`` beside the
dataset records what it was built from; training checks it against its own config.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.utils import tqdm_utils

from ipadapter_jax.data import pipeline, reader
from ipadapter_jax.data.sources import SkipRecord
from ipadapter_jax.data.tfds_builder import is_prepared_dataset, move_into_place
from ipadapter_jax.data.transforms import TrainTransform, TransformConfig, drop_flags, load_tokenizer, sample_rng
from ipadapter_jax.errors import ConfigError, UserError
from ipadapter_jax.sharding import MeshConfig, make_mesh
from ipadapter_jax.training import loss as loss_lib
from ipadapter_jax.training.inputs import materialize
from ipadapter_jax.training.loss import Unconditional
from ipadapter_jax.training.model import adapter_spec, load_encoders, read_base_info, read_encoder_config

META_FILE = "ipadapter_cache.json"
UNCOND_FILE = "unconditional.npz"  # the drop substitutes (empty prompt, dropped image), from the same encoders
VERSION = "1.0.0"
_INVALID = "unreadable record (when the cache was built)"


@dataclasses.dataclass(frozen=True)
class CacheReport:
    out_dir: Path
    num_records: int
    num_invalid: int
    meta: dict[str, Any]

    def summary(self) -> str:
        return (f"Encoded {self.num_records} records into {self.out_dir} ({self.num_invalid} unreadable, kept as "
                f"skipped records). Train from it with data.cache={self.out_dir}.")


def cache_meta(config, spec, info) -> dict[str, Any]:
    """What a cache depends on; a training config must agree with it to read the cache."""
    return {
        "base": str(Path(config.model.base).absolute()),
        "image_encoder": str(Path(config.model.image_encoder).absolute()),
        "image_feature": spec.image_feature,
        "resolution": config.data.resolution,
        "crop": config.data.crop,
        "dtype": config.model.dtype,
        "vae_dtype": config.model.vae_dtype or config.model.dtype,
        "is_xl": info.is_xl,
        "source": str(config.data.source),
        "split": config.data.split,
    }


def check_cache(cache_dir: str | Path, expected: dict[str, Any]) -> None:
    meta_path = Path(cache_dir) / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{cache_dir} is not an encoder cache (no {META_FILE}); build one with "
                        "build_encoder_cache or point data.cache elsewhere.")
    saved = json.loads(meta_path.read_text())
    for key in ("image_feature", "resolution", "crop", "is_xl", "base", "image_encoder"):
        if saved.get(key) != expected.get(key):
            raise ConfigError(f"The encoder cache {cache_dir} was built with {key}={saved.get(key)!r} but this run "
                              f"has {expected.get(key)!r}; rebuild the cache or fix the config.")


# --------------------------------------------------------------------------------------------- writing


class _CacheBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls):
        return None  # no checksums file; nothing is downloaded

    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def __init__(self, *, shapes: dict[str, tuple[tuple[int, ...], Any]], examples, **kwargs):
        self._shapes = shapes
        self._examples = examples
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {name: tfds.features.Tensor(shape=shape, dtype=dtype) for name, (shape, dtype) in
                    self._shapes.items()}
        features["valid"] = tfds.features.Scalar(dtype=np.bool_)
        features["record_index"] = tfds.features.Scalar(dtype=np.int64)
        return tfds.core.DatasetInfo(builder=self, description="IP-Adapter encoder cache (ipadapter_jax).",
                                     features=tfds.features.FeaturesDict(features), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for example in self._examples:
            yield f"{int(example['record_index']):012d}", example


def _cache_class(name: str):
    camel = "".join(part.title() for part in name.split("_"))
    return types.new_class(camel, (_CacheBuilder,), {"skip_registration": True},
                           lambda ns: ns.update(name=name, __module__=__name__))


def build_encoder_cache(config, out_dir: str | Path | None = None, *, batch_size: int = 16,
                        storage_dtype: str = "float32", overwrite: bool = False, num_threads: int = 8,
                        progress: bool = True) -> CacheReport:
    """Encode ``config.data.source`` with the frozen encoders of ``config.model`` into ``out_dir`` (default
    ``config.data.cache``, else ``<workdir>/encoder_cache``).

    Runs in one process on its default device (build once; every host then reads it). ``storage_dtype``
    ``float16`` halves the size (Plus features are (257, 1280) per image for ViT-H).
    """
    if storage_dtype not in ("float32", "float16"):
        raise ConfigError(f"storage_dtype must be float32 or float16, got {storage_dtype!r}.")
    if out_dir is None:
        if not config.data.cache and not config.workdir:
            raise ConfigError("Set data.cache (where the cache goes) or workdir; the cache has nowhere to go.")
        out_dir = config.data.cache or Path(config.workdir) / "encoder_cache"
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; choose a folder path for the encoder cache.")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / META_FILE).is_file():
            raise UserError(f"{out_dir} holds files and is not an encoder cache; --overwrite replaces only an encoder "
                            "cache: choose a new folder for the cache.")
        if not overwrite:
            raise UserError(f"{out_dir} already holds an encoder cache; choose a new folder or pass --overwrite.")
    config = materialize(dataclasses.replace(config, data=dataclasses.replace(config.data, cache=None)))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    info = read_base_info(config.model.base, config.model.dtype)
    encoder_config = read_encoder_config(config.model)
    spec, image_size = adapter_spec(config.model, info.unet_config, encoder_config), encoder_config.image_size
    encoders = load_encoders(config.model, info, mesh, (("(.*)", "replicated"),))
    graphdef, weights = nnx.split(encoders)
    source = reader.open_source(config.data.source, config.data.split, config.data.image_key,
                                config.data.text_key, data_dir=config.data.data_dir)
    if len(source) == 0:
        raise UserError(f"{source!r} has no records to cache.")
    transform = TrainTransform(transform_config(config, info, image_size, drops=False), config.seed)
    transform.load()

    @jax.jit
    def encode(weights, batch):  # weights as an argument, not a closure: no multi-GB constants in the program
        enc = loss_lib.encode(nnx.merge(graphdef, weights), spec, batch)
        out = {"moments": enc.moments, "text": enc.text, "image": enc.image}
        if enc.pooled is not None:
            out["pooled"] = enc.pooled
        return jax.tree.map(lambda x: x.astype(jnp.float32), out)

    store = np.float16 if storage_dtype == "float16" else np.float32
    keys = ["pixel_values", "clip_pixel_values", "input_ids"] + (["input_ids_2"] if info.is_xl else [])
    counts = {"invalid": 0}
    gen = _encoded(source, transform, lambda batch: encode(weights, batch), keys, batch_size, store, num_threads,
                   progress, counts)
    head = []  # up to the first valid record, which fixes the feature shapes
    while not head or not head[-1]["valid"]:
        try:
            head.append(next(gen))
        except StopIteration:
            raise UserError(f"No readable records in {source!r}; nothing to cache.") from None
    shapes = {k: (v.shape, v.dtype) for k, v in head[-1].items() if k not in ("valid", "record_index")}

    def examples():
        for example in itertools.chain(head, gen):
            yield _fill_invalid(example, shapes)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    was_active = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        builder = _cache_class("ipadapter_encoder_cache")(shapes=shapes, examples=examples(),
                                                          data_dir=str(tmp_root), file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        built = Path(builder.data_dir)
        meta = {**cache_meta(config, spec, info), "num_records": len(source), "num_invalid": counts["invalid"],
                "storage_dtype": storage_dtype}
        uncond = jax.device_get(jax.jit(lambda w, ids: loss_lib.unconditional(
            nnx.merge(graphdef, w), spec, ids, image_size))(weights, empty_ids(info)))
        np.savez(built / UNCOND_FILE, **{k: np.asarray(v, np.float32) for k, v in uncond._asdict().items()
                                         if v is not None})
        (built / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        move_into_place(built, out_dir)
    finally:
        tfds.display_progress_bar(was_active)
        shutil.rmtree(tmp_root, ignore_errors=True)
    return CacheReport(out_dir=out_dir, num_records=len(source), num_invalid=counts["invalid"], meta=meta)


def _encoded(source, transform, encode, keys, batch_size, store, num_threads, progress, counts):
    """Records in source order: encodings of readable ones, ``valid=False`` placeholders for the others."""
    def load(i):
        try:
            return transform(source[i], i, 0)
        except SkipRecord:
            return None

    n = len(source)
    bar = _progress(n, progress)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for start in range(0, n, batch_size):
            indices = list(range(start, min(n, start + batch_size)))
            loaded = list(pool.map(load, indices))
            good = [x for x in loaded if x is not None]
            encoded = None
            if good:
                stacked = {k: np.stack([x[k] for x in good]) for k in keys}
                pad = batch_size - len(good)  # one compiled shape for every batch
                if pad:
                    stacked = {k: np.concatenate([v, np.repeat(v[:1], pad, 0)]) for k, v in stacked.items()}
                encoded = jax.device_get(encode(stacked))
            row = 0
            for i, x in zip(indices, loaded, strict=True):
                if x is None:
                    counts["invalid"] += 1
                    yield {"record_index": i, "valid": False}
                    continue
                example = {k: np.asarray(v[row], store) for k, v in encoded.items()}
                row += 1
                if "time_ids" in x:
                    example["time_ids"] = x["time_ids"]
                yield {"record_index": i, "valid": True, **example}
            bar.update(len(indices))
    bar.close()


def _fill_invalid(example: dict, shapes: dict) -> dict:
    for name, (shape, dtype) in shapes.items():
        if name not in example:
            example[name] = np.zeros(shape, dtype)
    return example


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="encoding", unit="img")


def transform_config(config, info, image_size: int, *, drops: bool = True) -> TransformConfig:
    """The per-record transform of a training config (the official recipe's preprocessing)."""
    d = config.data
    return TransformConfig(
        tokenizer_path=info.tokenizer_paths[0], resolution=d.resolution, crop=d.crop, time_ids=info.is_xl,
        tokenizer_2_path=info.tokenizer_paths[1] if info.is_xl else None, clip_input=True,
        image_encoder_path=config.model.image_encoder, clip_image_size=image_size,
        p_drop_image=d.p_drop_image if drops else 0.0, p_drop_text=d.p_drop_text if drops else 0.0,
        p_drop_both=d.p_drop_both if drops else 0.0)


def empty_ids(info) -> tuple[np.ndarray, ...]:
    """Token ids of the empty prompt per tokenizer (1, L), padded as the training transform pads captions."""
    out = []
    for path in info.tokenizer_paths:
        tok = load_tokenizer(path)
        out.append(tok("", max_length=tok.model_max_length, padding="max_length", truncation=True,
                       return_tensors="np").input_ids.astype(np.int32))
    return tuple(out)


# --------------------------------------------------------------------------------------------- reading


def load_unconditional(cache_dir: str | Path):
    """The cache's drop substitutes as a ``loss.Unconditional``."""
    with np.load(Path(cache_dir) / UNCOND_FILE) as f:
        return Unconditional(text=jnp.asarray(f["text"]), image=jnp.asarray(f["image"]),
                             pooled=jnp.asarray(f["pooled"]) if "pooled" in f.files else None)


class CacheSource:
    """Random access to a cache's records (numpy dicts)."""

    def __init__(self, cache_dir: str | Path):
        if not is_prepared_dataset(cache_dir):
            raise UserError(f"{cache_dir} holds no encoder cache (no dataset_info.json); build one first.")
        builder = tfds.builder_from_directory(str(cache_dir))
        self._source = builder.as_data_source(split="train")
        self.description = str(cache_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return self._source[index]

    def __repr__(self) -> str:
        return f"CacheSource({self.description}, {len(self)} records)"


class CachedTransform:
    """Cached record -> training example, with the CFG drops drawn as ``TrainTransform`` draws them."""

    def __init__(self, p_drop_image: float, p_drop_text: float, p_drop_both: float, seed: int):
        self.p = (p_drop_image, p_drop_text, p_drop_both)
        self.seed = seed

    def __call__(self, record: dict, record_index: int, epoch: int) -> dict:
        if not bool(record["valid"]):
            raise SkipRecord(_INVALID)
        if int(record["record_index"]) != record_index:
            raise UserError("The encoder cache's records are out of order; rebuild it.")
        rng = sample_rng(self.seed, epoch, record_index)
        drop_image, drop_text = drop_flags(rng.random(), *self.p)
        out = {k: np.asarray(record[k], np.float32) for k in ("moments", "text", "image", "pooled", "time_ids")
               if k in record}
        out.update(drop_image=np.bool_(drop_image), drop_text=np.bool_(drop_text),
                   record_index=np.int32(record_index))
        return out


def make_cached_iterator(source: CacheSource, transform: CachedTransform, options: pipeline.BatchOptions
                         ) -> pipeline.TrainIterator:
    """The Grain pipeline of ``data.pipeline.make_train_iterator`` (same order of records, shards, skip
    counting and checkpointable state) over cached records."""
    return pipeline.TrainIterator(iter(pipeline.batched_dataset(source, transform, options)))
