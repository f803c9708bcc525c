"""Resolve a local folder or a Hugging Face Hub id to a local folder (the local cache is honoured)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ipadapter_jax.errors import UserError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _looks_like_path(name: str) -> bool:
    return not _REPO_ID.fullmatch(name)


def _weights(variant: str | None, ext: str) -> list[str]:
    names = ["diffusion_pytorch_model", "model", "pytorch_model"] if ext != "safetensors" else [
        "diffusion_pytorch_model", "model"]
    if variant:
        return [f"{n}.{variant}.{ext}" for n in names] + [f"{n}.{variant}-*-of-*.{ext}" for n in names] + [
            f"{n}.{ext}.index.{variant}.json" for n in names] + [f"{n}.{variant}.{ext}.index.json" for n in names]
    return [f"{n}.{ext}" for n in names] + [f"{n}-*-of-*.{ext}" for n in names] + [
        f"{n}.{ext}.index.json" for n in names]


def resolve(name_or_path: str | os.PathLike, *, subfolders: tuple[str, ...] = ("",), variant: str | None = None,
            revision: str | None = None, cache_dir: str | None = None, what: str = "model") -> Path:
    """A local folder as is; otherwise a hub repo id downloaded (or found in the cache) with only the configs,
    tokenizer files and preferred weights of `subfolders` (safetensors, else .bin)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if _looks_like_path(name):
        raise UserError(f"{what} folder {name} does not exist; pass an existing folder or a Hugging Face Hub id "
                        "such as runwayml/stable-diffusion-v1-5.")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a core dependency
        raise UserError("huggingface_hub is needed to load hub ids; pip install huggingface-hub.") from None

    def download(ext: str) -> Path:
        patterns = ["model_index.json"]
        for sub in subfolders:
            prefix = f"{sub}/" if sub else ""
            patterns += [f"{prefix}*.json", f"{prefix}*.txt"] + [prefix + w for w in _weights(variant, ext)]
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))

    try:
        folder = download("safetensors")
        if not all(_has_weights(folder / sub) for sub in subfolders if not _is_tokenizer(folder / sub)):
            folder = download("bin")
    except LocalEntryNotFoundError:
        raise UserError(f"{what} {name} is not in the local Hugging Face cache and cannot be downloaded (offline or "
                        "no network); connect, unset HF_HUB_OFFLINE, or pass a local folder.") from None
    except HfHubHTTPError as e:
        raise UserError(f"{what} {name} could not be fetched from the Hugging Face Hub ({e.__class__.__name__}); "
                        "check the repo id, revision and access token.") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {name} could not be resolved ({e}); check the id or pass a local folder.") from None
    return folder


def _is_tokenizer(folder: Path) -> bool:
    return (folder / "vocab.json").exists() or (folder / "tokenizer_config.json").exists() or (
        folder / "scheduler_config.json").exists()


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir())


def resolve_path(spec: str | os.PathLike, *, what: str = "file", revision: str | None = None) -> Path:
    """A local file or folder as is; otherwise `owner/repo/path/in/repo` on the Hugging Face Hub (a file such
    as `h94/IP-Adapter/models/ip-adapter_sd15.safetensors`, or a folder such as `h94/IP-Adapter/models/
    image_encoder`), downloaded or found in the local cache."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    parts = text.split("/")
    if len(parts) < 3 or not _REPO_ID.fullmatch("/".join(parts[:2])):
        raise UserError(f"{what} {text} does not exist; pass a local path or owner/repo/path on the Hugging Face Hub.")
    repo, inner = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        if Path(inner).suffix in (".safetensors", ".bin", ".pt", ".pth", ".npy", ".npz"):
            return Path(hf_hub_download(repo, inner, revision=revision))
        patterns = [f"{inner}/*.json", f"{inner}/*.txt", f"{inner}/*.safetensors"]
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns)) / inner
        if not _has_weights(folder):
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=[*patterns, f"{inner}/*.bin"]))
            folder = folder / inner
        if not folder.is_dir():
            raise UserError(f"{what} {text}: the repo {repo} has no folder {inner}.")
        return folder
    except LocalEntryNotFoundError:
        raise UserError(f"{what} {text} is not in the local Hugging Face cache and cannot be downloaded (offline or "
                        "no network); connect, unset HF_HUB_OFFLINE, or pass a local path.") from None
    except EntryNotFoundError:
        raise UserError(f"{what} {text}: the repo {repo} has no file {inner}.") from None
    except HfHubHTTPError as e:
        raise UserError(f"{what} {text} could not be fetched from the Hugging Face Hub ({e.__class__.__name__}); "
                        "check the repo id and your access token.") from None
