"""Random-access reading of any array_record TFDS dataset that has an image and a caption feature."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from ipadapter_jax.data.transforms import as_text
from ipadapter_jax.errors import UserError


class RecordSource:
    """A picklable random-access source of ``{"image": bytes | uint8 HWC, "text": str[, "face_embed": ...]}``.

    Wraps a TFDS data source and renames its features to those canonical keys. Images of a TFDS ``Image``
    feature come back still encoded, so decoding errors surface in the transform that counts them.
    """

    def __init__(self, data_source, *, image_key: str, text_key: str, face_embed_key: str | None,
                 description: str = ""):
        self._source = data_source
        self._keys = {"image": image_key, "text": text_key}
        if face_embed_key is not None:
            self._keys["face_embed"] = face_embed_key
        self.description = description

    @property
    def has_face_embed(self) -> bool:
        return "face_embed" in self._keys

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        out = {name: record[key] for name, key in self._keys.items()}
        out["text"] = as_text(out["text"])
        return out

    def __repr__(self) -> str:
        return f"RecordSource({self.description or self._source!r}, {len(self)} records)"


def open_source(
    data_dir_or_name: str | Path,
    split: str = "train",
    image_key: str = "image",
    text_key: str = "text",
    *,
    face_embed_key: str | None = "face_embed",
    data_dir: str | Path | None = None,
) -> RecordSource:
    """Open a prepared dataset folder (``prepare_dataset``'s ``out_dir``, a TFDS data dir) or a TFDS name.

    A folder is searched for one ``dataset_info.json`` (the folder itself or a ``name/[config/]version``
    below it). A name (``"coco_captions"``, ``"name:1.0.0"``) is looked up in ``data_dir``; nothing is
    downloaded. ``face_embed_key`` is used when the dataset has it and ignored otherwise.
    """
    builder, where = _builder(data_dir_or_name, data_dir)
    features = builder.info.features
    keys = sorted(features.keys())
    for role, key in (("image", image_key), ("text", text_key)):
        if key not in features:
            raise UserError(f"Dataset {where} has no {role} feature {key!r}; its features are {keys}.")
    if builder.info.splits and split.split("[")[0] not in builder.info.splits:
        splits = sorted(builder.info.splits)
        raise UserError(f"Dataset {where} has no split {split!r}; its splits are {splits}.")
    encoded = isinstance(features[image_key], tfds.features.Image)
    decoders = {image_key: tfds.decode.SkipDecoding()} if encoded else None
    try:
        data_source = builder.as_data_source(split=split, decoders=decoders)
    except (NotImplementedError, ValueError) as e:
        raise UserError(
            f"Dataset {where} cannot be read by index ({e}); prepare it with file_format='array_record'."
        ) from None
    return RecordSource(
        data_source,
        image_key=image_key,
        text_key=text_key,
        face_embed_key=face_embed_key if face_embed_key in features else None,
        description=f"{where}[{split}]",
    )


def _builder(data_dir_or_name: str | Path, data_dir: str | Path | None):
    path = Path(data_dir_or_name)
    if path.is_dir():
        infos = [path / "dataset_info.json"] if (path / "dataset_info.json").is_file() else sorted(
            p for pattern in ("*/*/dataset_info.json", "*/*/*/dataset_info.json") for p in path.glob(pattern)
        )
        if not infos:
            raise UserError(f"{path} holds no prepared TFDS dataset (no dataset_info.json); prepare first.")
        if len(infos) > 1:
            found = ", ".join(str(p.parent) for p in infos)
            raise UserError(f"{path} holds several datasets ({found}); pass the folder of the one to use.")
        return tfds.builder_from_directory(str(infos[0].parent)), str(infos[0].parent)
    if isinstance(data_dir_or_name, Path) or str(data_dir_or_name).startswith(("/", ".", "~")):
        raise UserError(f"Dataset folder {data_dir_or_name} does not exist; check the path.")
    try:  # a catalogue name such as "coco_captions/2017:1.0.0"
        builder = tfds.builder(str(data_dir_or_name), data_dir=None if data_dir is None else str(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"{data_dir_or_name!r} is neither a dataset folder nor a TFDS dataset name; "
                        "pass the folder prepare wrote.") from None
    if not builder.is_prepared():
        raise UserError(
            f"TFDS dataset {data_dir_or_name!r} is not prepared in {builder.data_dir}; "
            "prepare it with file_format='array_record' or pass data_dir."
        )
    return builder, str(data_dir_or_name)
