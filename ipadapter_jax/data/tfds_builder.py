"""Write image+caption training data as an array_record TFDS dataset (no TensorFlow needed).

``prepare_dataset`` builds into a hidden folder beside ``out_dir`` and renames it into place at the end,
so an interrupted run leaves no half dataset at ``out_dir``. Read it back with
``ipadapter_jax.data.reader.open_source(out_dir)``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import re
import shutil
import tempfile
import types
import uuid
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.utils import tqdm_utils

from ipadapter_jax.data import sources
from ipadapter_jax.errors import ConfigError, UserError

VERSION = "1.0.0"
_MAX_REPORTED = 20
_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class PrepareReport:
    """What ``prepare_dataset`` wrote and what it skipped, by reason."""

    out_dir: Path
    name: str
    num_written: int
    skipped: dict[str, int]  # reason -> count
    skipped_examples: tuple[tuple[str, str], ...]  # (item key, reason), the first few
    has_face_embed: bool

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        lines = [f"Wrote {self.num_written} records to {self.out_dir} (dataset {self.name!r}); "
                 f"skipped {self.num_skipped}."]
        lines += [f"  {count:>8}  {reason}" for reason, count in sorted(self.skipped.items())]
        lines += [f"  e.g. {key}: {reason}" for key, reason in self.skipped_examples[:5]]
        return "\n".join(lines)


class _Tally:
    def __init__(self):
        self.written = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.examples: list[tuple[str, str]] = []

    def skip(self, key: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < _MAX_REPORTED:
            self.examples.append((key, reason))


class ImageCaptionBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Features ``image`` (encoded RGB PNG/JPEG), ``text`` and, for FaceID, ``face_embed`` float32 (512,)."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Image, caption and optional face embedding."}

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS looks for a checksums file beside the builder's code and, for a builder inside a package,
        # needs importlib_resources (which it does not declare) to find it. This builder downloads nothing.
        return None

    # TFDS prints the temporary build folder and "subsequent calls will reuse this data"; both mislead here.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def __init__(self, *, items: list[sources.SourceItem], with_face_embed: bool, num_threads: int, **kwargs):
        self._items = items
        self._with_face_embed = with_face_embed
        self._num_threads = num_threads
        self.tally = _Tally()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"image": tfds.features.Image(shape=(None, None, 3)), "text": tfds.features.Text()}
        if self._with_face_embed:
            features["face_embed"] = tfds.features.Tensor(shape=(sources.FACE_EMBED_DIM,), dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-caption pairs for IP-Adapter training, written by ipadapter_jax.",
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {"train": self._generate_examples()}

    def _load(self, item: sources.SourceItem):
        try:
            return sources.load_example(item, with_face_embed=self._with_face_embed)
        except sources.SkipRecord as skip:
            return skip

    def _generate_examples(self):
        # Decoding every image to validate it dominates; PIL releases the GIL, so threads help. Chunks
        # bound how many decoded records wait in memory.
        with concurrent.futures.ThreadPoolExecutor(self._num_threads) as pool:
            for start in range(0, len(self._items), _CHUNK):
                chunk = self._items[start:start + _CHUNK]
                for offset, (item, result) in enumerate(zip(chunk, pool.map(self._load, chunk), strict=True)):
                    if isinstance(result, sources.SkipRecord):
                        self.tally.skip(item.key, result.reason)
                        continue
                    self.tally.written += 1
                    yield f"{start + offset:010d}", result


def _builder_class(name: str) -> type[ImageCaptionBuilder]:
    # TFDS takes a dataset's name (used in file names and dataset_info.json) from its class.
    camel = "".join(part.title() for part in name.split("_"))
    return types.new_class(camel, (ImageCaptionBuilder,), {"skip_registration": True},
                           lambda ns: ns.update(name=name, __module__=__name__))


def is_prepared_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a finished TFDS dataset version folder."""
    return (Path(path) / "dataset_info.json").is_file()


def prepare_dataset(
    source: str | Path,
    out_dir: str | Path,
    *,
    image_root: str | Path | None = None,
    name: str = "ip_adapter_images",
    num_shards: int | None = None,
    overwrite: bool = False,
    num_threads: int = 8,
    progress: bool = True,
) -> PrepareReport:
    """Write ``source`` (official JSON/JSONL list or caption folder) as an array_record TFDS dataset.

    Broken records are skipped and counted in the report. A face-embedding feature is written when any
    JSON entry has ``id_embed_file``; entries without one are then skipped. ``num_shards=None`` lets TFDS
    choose; ``num_threads`` read and validate images. ``out_dir`` ends up holding ``dataset_info.json``
    and the ``*.array_record-*`` shards.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(f"Dataset name {name!r} must be snake_case (a-z, 0-9, _), starting with a letter.")
    if num_shards is not None and num_shards < 1:
        raise ConfigError(f"num_shards must be at least 1, got {num_shards}.")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"Output {out_dir} is a file; choose a folder path for the dataset.")
        if is_prepared_dataset(out_dir):
            if not overwrite:
                raise UserError(f"A prepared dataset exists at {out_dir}; pass --overwrite to replace it.")
        elif any(out_dir.iterdir()):
            raise UserError(f"Output folder {out_dir} is not empty and holds no dataset; "
                            "choose an empty or new folder.")

    items = sources.list_source(source, image_root)
    if not items:
        raise UserError(f"Data source {source} lists no images; point it at a JSON list or an image folder.")
    with_face_embed = any(item.face_embed_path is not None for item in items)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    was_active = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(progress)
    try:
        builder = _builder_class(name)(
            items=items, with_face_embed=with_face_embed, num_threads=num_threads, data_dir=str(tmp_root),
            file_format="array_record",
        )
        tally = builder.tally
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(num_shards=num_shards, try_download_gcs=False)
            )
        except Exception:
            if tally.written == 0:  # TFDS refuses to finish an empty split
                raise UserError(f"No usable records in {source}: skipped {dict(tally.skipped)}; "
                                "fix the inputs and prepare again.") from None
            raise
        move_into_place(Path(builder.data_dir), out_dir)
    finally:
        tfds.display_progress_bar(was_active)
        shutil.rmtree(tmp_root, ignore_errors=True)
    return PrepareReport(
        out_dir=out_dir,
        name=name,
        num_written=tally.written,
        skipped=dict(tally.skipped),
        skipped_examples=tuple(tally.examples),
        has_face_embed=with_face_embed,
    )


def move_into_place(built: Path, out_dir: Path) -> None:
    # Renames within one folder are atomic; an old dataset is moved aside first and deleted last, so a
    # crash in between leaves it whole under its hidden name.
    if out_dir.exists() and any(out_dir.iterdir()):
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
        built.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        built.rename(out_dir)
