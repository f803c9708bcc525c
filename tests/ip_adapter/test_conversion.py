"""Official -> Flax folder -> official is bit-exact (keys, dtypes, bytes) from .bin and .safetensors; bad files
fail with one clear sentence and leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference_models import SD1_UNET, SDXL_UNET, official_ip_adapter, save_official_ip_adapter

from ipadapter_jax.errors import CheckpointError, ConfigError, UserError
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.weights.ip_adapter_files import (
    SPEC_FILE,
    WEIGHTS_FILE,
    convert_to_flax,
    convert_to_torch,
    export_ip_adapter,
    load_ip_adapter,
    save_ip_adapter,
)
from ipadapter_jax.weights.safetensors_io import SafetensorsFile

RESAMPLER = dict(dim=48, depth=2, heads=1, embedding_dim=40)
CASES = {"base": dict(image_dim=24), "plus": dict(tokens=6, resampler=RESAMPLER), "full": dict(image_dim=40),
         "faceid": dict(lora_rank=4), "faceid-plus": dict(resampler=RESAMPLER, lora_rank=2)}
SD1 = UNetConfig.from_dict(SD1_UNET)


@pytest.fixture(scope="module")
def ref_unets(torch):
    from diffusers import UNet2DConditionModel

    return {"sd1": UNet2DConditionModel(**SD1_UNET), "sdxl": UNet2DConditionModel(**SDXL_UNET)}


def _raw(path):
    """Every tensor of an official file as (dtype name, shape, bytes), read by the reference libraries."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    else:
        nested = torch.load(path, weights_only=True)
        assert set(nested) == {"image_proj", "ip_adapter"}
        flat = {f"{part}.{k}": v for part, sd in nested.items() for k, v in sd.items()}
    return {k: (str(v.dtype), tuple(v.shape), v.contiguous().view(torch.uint8).numpy().tobytes())
            for k, v in flat.items()}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("ext", [".bin", ".safetensors"])
@pytest.mark.parametrize("variant", ["base", "plus", "full", "faceid"])
def test_round_trip_is_bit_exact(tmp_path, torch, ref_unets, variant, ext, dtype):
    state = official_ip_adapter(ref_unets["sd1"], variant, dtype=getattr(torch, dtype), **CASES[variant])
    src = save_official_ip_adapter(state, tmp_path / f"src{ext}")
    spec = convert_to_flax(src, tmp_path / "flax", unet_config=SD1)
    assert spec.variant == variant
    meta = json.loads((tmp_path / "flax" / SPEC_FILE).read_text())
    assert meta["dtype"] == dtype and meta["spec"]["variant"] == variant
    flax_file = SafetensorsFile(tmp_path / "flax" / WEIGHTS_FILE)
    assert {flax_file.dtype(k).name for k in flax_file} == {dtype}  # the source dtype is kept, not cast
    assert "image_proj.proj.kernel" in flax_file or "image_proj.latents" in flax_file or any(
        k.startswith("image_proj.proj.0") for k in flax_file)
    out = convert_to_torch(tmp_path / "flax", tmp_path / f"out{ext}")
    before, after = _raw(src), _raw(out)
    assert before.keys() == after.keys()
    for k in before:
        assert before[k] == after[k], k


def test_bfloat16_and_cross_format_round_trip(tmp_path, torch, ref_unets):
    state = official_ip_adapter(ref_unets["sd1"], "faceid-plus", dtype=torch.bfloat16, **CASES["faceid-plus"])
    src = save_official_ip_adapter(state, tmp_path / "src.bin")
    convert_to_flax(src, tmp_path / "flax", unet_config=SD1)
    a = _raw(convert_to_torch(tmp_path / "flax", tmp_path / "out.safetensors"))
    b = _raw(src)
    assert a == b


def test_flax_folder_loads_and_saves_identically(tmp_path, torch, ref_unets):
    state = official_ip_adapter(ref_unets["sd1"], "plus", **CASES["plus"])
    src = save_official_ip_adapter(state, tmp_path / "src.safetensors")
    from_file = load_ip_adapter(src, unet_config=SD1)
    convert_to_flax(src, tmp_path / "flax", unet_config=SD1)
    from_folder = load_ip_adapter(tmp_path / "flax")
    assert from_folder.spec == from_file.spec
    t1, t2 = from_file.tensors(), from_folder.tensors()
    assert t1.keys() == t2.keys() and all(np.array_equal(t1[k], t2[k]) for k in t1)
    save_ip_adapter(from_folder, tmp_path / "saved")
    export_ip_adapter(from_folder, tmp_path / "exported.bin")
    assert _raw(tmp_path / "exported.bin") == _raw(src)


# ------------------------------------------------------------------------------------------ bad inputs


def _nothing_left(parent, expected):
    assert sorted(p.name for p in parent.iterdir()) == sorted(expected)


def test_truncated_files_fail_clearly_and_write_nothing(tmp_path, torch, ref_unets):
    state = official_ip_adapter(ref_unets["sd1"], "base", **CASES["base"])
    for ext, phrase in ((".safetensors", "truncated"), (".bin", "not a readable PyTorch checkpoint")):
        src = save_official_ip_adapter(state, tmp_path / f"src{ext}")
        data = src.read_bytes()
        src.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(CheckpointError, match=phrase):
            convert_to_flax(src, tmp_path / "out", unet_config=SD1)
    _nothing_left(tmp_path, ["src.safetensors", "src.bin"])


def test_missing_and_extra_keys_are_named(tmp_path, torch, ref_unets):
    state = official_ip_adapter(ref_unets["sd1"], "plus", **CASES["plus"])
    del state["image_proj"]["layers.1.0.norm2.bias"]
    del state["ip_adapter"]["5.to_v_ip.weight"]
    state["image_proj"]["pos_emb.weight"] = state["image_proj"]["latents"][0].clone()
    src = save_official_ip_adapter(state, tmp_path / "src.safetensors")
    with pytest.raises(CheckpointError) as e:
        convert_to_flax(src, tmp_path / "out", unet_config=SD1)
    msg = str(e.value)
    assert "missing keys: image_proj.layers.1.0.norm2.bias, ip_adapter.5.to_v_ip.weight" in msg
    assert "unexpected keys: image_proj.pos_emb.weight" in msg
    _nothing_left(tmp_path, ["src.safetensors"])


def test_foreign_file_is_rejected(tmp_path, torch):
    src = tmp_path / "unet.safetensors"
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(src))
    with pytest.raises(CheckpointError, match="not an IP-Adapter checkpoint"):
        load_ip_adapter(src, unet_config=SD1)


def test_adapter_for_another_unet(tmp_path, torch, ref_unets):
    state = official_ip_adapter(ref_unets["sdxl"], "base", **CASES["base"])
    src = save_official_ip_adapter(state, tmp_path / "xl.bin")
    with pytest.raises(UserError, match=r"cross-attention 64, 28 layers\) and cannot drive this custom-size UNet "
                                        r"\(32, 6 layers\)"):
        convert_to_flax(src, tmp_path / "out", unet_config=SD1)
    _nothing_left(tmp_path, ["xl.bin"])
    # A non-standard layer count without a UNet config asks for one.
    with pytest.raises(ConfigError, match="pass --base sd15\\|sd2\\|sdxl or the UNet folder"):
        convert_to_flax(src, tmp_path / "out")
    # A folder made for one UNet refuses another.
    convert_to_flax(src, tmp_path / "flax", unet_config=UNetConfig.from_dict(SDXL_UNET))
    with pytest.raises(UserError, match="cannot drive"):
        load_ip_adapter(tmp_path / "flax", unet_config=SD1)


def test_existing_outputs_are_never_overwritten_by_default(tmp_path, torch, ref_unets):
    state = official_ip_adapter(ref_unets["sd1"], "base", **CASES["base"])
    src = save_official_ip_adapter(state, tmp_path / "src.bin")
    (tmp_path / "flax").mkdir()
    (tmp_path / "flax" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        convert_to_flax(src, tmp_path / "flax", unet_config=SD1)
    with pytest.raises(UserError, match="not an ipadapter-jax adapter folder"):  # --overwrite spares it too
        convert_to_flax(src, tmp_path / "flax", unet_config=SD1, overwrite=True)
    assert (tmp_path / "flax" / "keep.txt").read_text() == "mine"
    (tmp_path / "flax" / "keep.txt").unlink()
    convert_to_flax(src, tmp_path / "flax", unet_config=SD1)  # an empty folder is as good as none
    convert_to_flax(src, tmp_path / "flax", unet_config=SD1, overwrite=True)  # our own folder is replaced
    assert sorted(p.name for p in (tmp_path / "flax").iterdir()) == [SPEC_FILE, WEIGHTS_FILE]
    with pytest.raises(UserError, match="already exists"):
        convert_to_torch(tmp_path / "flax", src)
    with pytest.raises(UserError, match="must end in .safetensors or .bin"):
        convert_to_torch(tmp_path / "flax", tmp_path / "out.npz")
    _nothing_left(tmp_path, ["src.bin", "flax"])


def test_damaged_flax_folder(tmp_path, torch, ref_unets):
    from ipadapter_jax.weights.safetensors_io import save_safetensors

    state = official_ip_adapter(ref_unets["sd1"], "full", **CASES["full"])
    convert_to_flax(save_official_ip_adapter(state, tmp_path / "src.bin"), tmp_path / "flax", unet_config=SD1)
    f = SafetensorsFile(tmp_path / "flax" / WEIGHTS_FILE)
    tensors = {k: np.array(f[k]) for k in f if k != "image_proj.proj.3.bias"}
    save_safetensors(tensors, tmp_path / "flax" / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="missing keys: image_proj.proj.3.bias"):
        convert_to_torch(tmp_path / "flax", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    with pytest.raises(CheckpointError, match="no ip_adapter.json"):
        load_ip_adapter(tmp_path)


def test_accelerate_training_checkpoint_converts_like_the_readme(tmp_path, torch, ref_unets):
    """`checkpoint-N/pytorch_model.bin` (image_proj_model.*, adapter_modules.*, unet.*) -> the official file."""
    state = official_ip_adapter(ref_unets["sd1"], "base", **CASES["base"])
    flat = {"unet.conv_in.weight": torch.zeros(3)}
    flat.update({f"image_proj_model.{k}": v for k, v in state["image_proj"].items()})
    flat.update({f"adapter_modules.{k}": v for k, v in state["ip_adapter"].items()})
    torch.save(flat, tmp_path / "pytorch_model.bin")
    convert_to_flax(tmp_path / "pytorch_model.bin", tmp_path / "flax", unet_config=SD1)
    assert _raw(convert_to_torch(tmp_path / "flax", tmp_path / "ip_adapter.bin")) == _raw(
        save_official_ip_adapter(state, tmp_path / "official.bin"))
