"""Tiny random checkpoints written in the real on-disk formats, for the offline demo and the tests.

Nothing here downloads anything: tokenizers get a byte-level CLIP vocabulary, models get random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.ip_adapter import IPAdapter
from ipadapter_jax.models.adapter_spec import make_spec
from ipadapter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from ipadapter_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from ipadapter_jax.models.controlnet import ControlNetModel
from ipadapter_jax.models.controlnet_config import ControlNetConfig
from ipadapter_jax.models.image_proj import build_image_proj
from ipadapter_jax.models.layers import abstract_model
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from ipadapter_jax.weights.ip_adapter_files import export_ip_adapter
from ipadapter_jax.weights.lora_keys import module_index, sgm_name, sgm_names
from ipadapter_jax.weights.safetensors_io import save_safetensors
from ipadapter_jax.weights.torch_layout import flat_variables, to_torch_layout, torch_key


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes (GPT-2's table)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_tokenizer(
    folder: str | Path, *, max_length: int = 77, pad_token: str = "<|endoftext|>"
) -> Path:
    """Write a working CLIP BPE tokenizer (vocab.json, merges.txt, configs) covering any text in 518 ids."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for c in alphabet:
        vocab[c] = len(vocab)
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


# Configs valid for both this project and diffusers/transformers, so the same folders load in PyTorch.
TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 16,
}
TINY_UNET_XL = {
    **TINY_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
}
# The real SD1.5 / SDXL block layouts (16 / 11 attention blocks, which the weight types index) at tiny widths.
TINY_UNET_FULL_LAYOUT = {
    **TINY_UNET,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
TINY_UNET_XL_FULL_LAYOUT = {
    **TINY_UNET_XL,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 2, 4],
}
TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "sample_size": 64,
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "scaling_factor": 0.18215,
}
TINY_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 518,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 516,
    "eos_token_id": 517,
    "pad_token_id": 517,
    "projection_dim": 32,
    "layer_norm_eps": 1e-5,
}
TINY_IMAGE_ENCODER = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "model_type": "clip_vision_model",
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 24,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
SCHEDULER_XL = {
    **SCHEDULER,
    "_class_name": "EulerDiscreteScheduler",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def _random_state(build, seed: int) -> dict[str, np.ndarray]:
    """PyTorch-layout random weights for the model `build()` would construct, without running its init."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, var in flat_variables(abstract_model(build)).items():
        leaf = str(path[-1])
        shape = tuple(var.shape)
        if leaf == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf == "bias":
            value = 0.05 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
            value = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(leaf, value.astype(np.float32)))
    return out


def write_random_model(folder: Path, config: dict, build, basename: str, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_safetensors(_random_state(build, seed), folder / f"{basename}.safetensors")


def write_random_pipeline(folder: str | Path, *, unet: dict, vae: dict, text: dict, text_2: dict | None = None,
                          scheduler: dict, seed: int = 0) -> Path:
    """A diffusers-format Stable Diffusion folder (model_index.json, unet, vae, text encoder(s), tokenizer(s),
    scheduler) with random weights for the given configs (the tokenizers are the tiny byte-level ones)."""
    folder = Path(folder)
    rngs = lambda: nnx.Rngs(0)  # noqa: E731 - only shapes are traced (eval_shape)
    write_random_model(folder / "unet", unet, lambda: UNet2DConditionModel(UNetConfig.from_dict(unet), rngs=rngs()),
                 "diffusion_pytorch_model", seed)
    write_random_model(folder / "vae", vae, lambda: AutoencoderKL(AutoencoderKLConfig.from_dict(vae), rngs=rngs()),
                 "diffusion_pytorch_model", seed + 1)
    write_random_model(folder / "text_encoder", text,
                       lambda: CLIPTextModel(CLIPTextConfig.from_dict(text), rngs=rngs()),
                 "model", seed + 2)
    write_tiny_tokenizer(folder / "tokenizer")
    index = {
        "_class_name": "StableDiffusionXLPipeline" if text_2 else "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
    }
    if text_2:
        write_random_model(folder / "text_encoder_2", text_2,
                     lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(text_2), rngs=rngs()), "model",
                     seed + 3)
        write_tiny_tokenizer(folder / "tokenizer_2", pad_token="!")
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_tiny_pipeline(folder: str | Path, kind: str = "sd15", seed: int = 0, in_channels: int = 4,
                        full_layout: bool = False) -> Path:
    """A tiny random SD1.5- or SDXL-shaped pipeline folder: 64x64 images from 16x16 latents.
    `in_channels=9` gives an inpainting UNet; `full_layout` the real model's blocks (for weight types)."""
    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"kind must be sd15 or sdxl, not {kind!r}")
    xl = kind == "sdxl"
    layouts = {(False, False): TINY_UNET, (True, False): TINY_UNET_XL, (False, True): TINY_UNET_FULL_LAYOUT,
               (True, True): TINY_UNET_XL_FULL_LAYOUT}
    unet = {**layouts[xl, full_layout], "in_channels": in_channels}
    text_2 = {**TINY_TEXT, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu"} if xl else None
    return write_random_pipeline(folder, unet=unet, vae=TINY_VAE, text=TINY_TEXT, text_2=text_2,
                                 scheduler=SCHEDULER_XL if xl else SCHEDULER, seed=seed)


# UNet config fields a ControlNet copies from its base (as diffusers' `ControlNetModel.from_unet`).
_CONTROLNET_FROM_UNET = (
    "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "attention_head_dim", "num_attention_heads", "use_linear_projection", "upcast_attention",
    "transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)


def write_tiny_controlnet(folder: str | Path, base_folder: str | Path, *, seed: int = 4, **overrides) -> Path:
    """A diffusers `ControlNetModel` folder with random weights (zero convs included) for the pipeline at
    `base_folder`: its UNet's encoder half, and a conditioning embedding that downsamples images by the VAE's
    factor. `overrides` set ControlNet config fields (e.g. `controlnet_conditioning_channel_order="bgr"`)."""

    base = Path(base_folder)
    unet = json.loads((base / "unet" / "config.json").read_text())
    vae = json.loads((base / "vae" / "config.json").read_text())
    steps = len(vae.get("block_out_channels", (0,) * 4)) - 1  # the VAE's 2x downsamplings
    config = {
        "_class_name": "ControlNetModel",
        "_diffusers_version": "0.30.0",
        **{k: unet[k] for k in _CONTROLNET_FROM_UNET if k in unet},
        "in_channels": unet.get("out_channels", 4),
        "conditioning_channels": 3,
        "conditioning_embedding_out_channels": [8 * 2**i for i in range(steps + 1)],
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
        **overrides,
    }
    parsed = ControlNetConfig.from_dict(config)
    folder = Path(folder)
    write_random_model(folder, config, lambda: ControlNetModel(parsed, rngs=nnx.Rngs(0)), "diffusion_pytorch_model",
                       seed)
    return folder


def _lora_key(style: str, target: str, path: str, part: str, kohya_name: str) -> str:
    if style == "kohya":
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[target]
        return f"{prefix}{kohya_name}." + {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}[part]
    if style == "peft":
        return f"{target}.{path}.lora_{'A' if part == 'down' else 'B'}.weight"
    # diffusers-old: attention processors' to_q_lora..., `.lora_linear_layer` (CLIP) or `.lora` elsewhere
    parent, _, name = path.rpartition(".")
    processor = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out", "q_proj": "to_q",
                 "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    if path.endswith("to_out.0"):
        parent, name = path.removesuffix(".to_out.0"), "to_out.0"
    if name in processor:
        attn = f"{parent}.processor" if target == "unet" else parent
        return f"{target}.{attn}.{processor[name]}_lora.{part}.weight"
    return f"{target}.{path}.{'lora' if target == 'unet' else 'lora_linear_layer'}.{part}.weight"


def write_tiny_lora(path: str | Path, pipeline_folder: str | Path, *, style: str = "peft", rank: int = 4,
                    seed: int = 5, alpha: float | None = None, sgm: bool | None = None) -> Path:
    """A LoRA `.safetensors` for the tiny pipeline at `pipeline_folder`: random factors on every Linear and Conv2d
    of the UNet (LoCon convolutions included) and on the text encoders' attention and MLP layers.

    style: "peft" (diffusers' `unet.<path>.lora_A.weight`; `alpha` goes into `lora_adapter_metadata`),
    "diffusers-old" (`to_q_lora`, `.lora.down`, `.lora_linear_layer` spellings) or "kohya" (`lora_unet_...` with
    per-layer `.alpha`, `alpha` or varying; `sgm` names the UNet's layers as the original SGM UNet, kohya's SDXL
    spelling, and defaults to True for SDXL)."""

    if style not in ("peft", "diffusers-old", "kohya"):
        raise ValueError(f"style must be peft, diffusers-old or kohya, not {style!r}")
    folder = Path(pipeline_folder)
    read = lambda sub: json.loads((folder / sub / "config.json").read_text())  # noqa: E731
    models = {"unet": abstract_model(lambda: UNet2DConditionModel(UNetConfig.from_dict(read("unet")),
                                                                  rngs=nnx.Rngs(0)))}
    for target, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if (folder / target).is_dir():
            config = CLIPTextConfig.from_dict(read(target))
            models[target] = abstract_model(lambda c=config, k=cls: k(c, rngs=nnx.Rngs(0)))
    sgm = ("text_encoder_2" in models) if sgm is None else sgm
    rng = np.random.default_rng(seed)
    tensors, targets = {}, {}
    for target, model in models.items():
        index = module_index(model, target)
        table = sgm_names(model) if target == "unet" and sgm else {}
        for dotted, module in index.modules.items():
            if target != "unet" and not dotted.endswith(("_proj", "fc1", "fc2")) or dotted == "text_projection":
                continue
            name = (sgm_name(dotted, table) if table else dotted).replace(".", "_")
            assert index.kohya[name] == dotted, f"kohya name {name} is ambiguous"
            shape = tuple(module.kernel.shape)
            n_in, n_out, k = (shape[0], shape[1], ()) if len(shape) == 2 else (shape[2], shape[3], shape[:2])
            down = rng.standard_normal((rank, n_in, *k)) / np.sqrt(n_in * int(np.prod(k or (1,))))
            up = 0.5 * rng.standard_normal((n_out, rank, *((1, 1) if k else ()))) / np.sqrt(rank)
            tensors[_lora_key(style, target, dotted, "down", name)] = down.astype(np.float32)
            tensors[_lora_key(style, target, dotted, "up", name)] = up.astype(np.float32)
            if style == "kohya":
                value = alpha if alpha is not None else float(rng.choice([1.0, rank / 2, 2.0 * rank]))
                tensors[_lora_key(style, target, dotted, "alpha", name)] = np.asarray(value, np.float32)
            parts = dotted.split(".")  # PEFT target names end module paths: "to_q", "to_out.0", "net.2"
            targets.setdefault(target, set()).add(".".join(parts[-2:] if parts[-1].isdigit() else parts[-1:]))
    metadata = {}
    if style == "peft" and alpha is not None:
        config = {f"{t}.{field}": value for t, modules in targets.items()
                  for field, value in (("r", rank), ("lora_alpha", alpha), ("target_modules", sorted(modules)))}
        metadata["lora_adapter_metadata"] = json.dumps(config, sort_keys=True)
    save_safetensors(tensors, Path(path), metadata=metadata)
    return Path(path)


def write_random_image_encoder(folder: str | Path, config: dict, seed: int = 1) -> Path:
    """A transformers `CLIPVisionModelWithProjection` folder with random weights plus its
    preprocessor_config.json (CLIP's standard preprocessing at the config's image size)."""
    folder = Path(folder)
    parsed = CLIPVisionConfig.from_dict(config)
    write_random_model(folder, config, lambda: CLIPVisionModelWithProjection(parsed, rngs=nnx.Rngs(0)), "model", seed)
    size = config["image_size"]
    processor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder


def write_tiny_image_encoder(folder: str | Path, seed: int = 1) -> Path:
    """A tiny CLIP image encoder folder: 32 px, a ViT with 24-d image_embeds."""
    return write_random_image_encoder(folder, TINY_IMAGE_ENCODER, seed)


def write_tiny_ip_adapter(path: str | Path, pipeline_folder: str | Path, image_encoder_folder: str | Path,
                          variant: str = "base", seed: int = 2) -> Path:
    """An IP-Adapter in the official layout (`.safetensors` or `.bin` by extension) for a tiny pipeline and
    image encoder written above: random projection and `to_k_ip`/`to_v_ip` (and, for FaceID, a rank-4 LoRA on
    every attention layer)."""
    unet_config = UNetConfig.from_json(Path(pipeline_folder) / "unet" / "config.json")
    encoder = json.loads((Path(image_encoder_folder) / "config.json").read_text())
    width = encoder["projection_dim"] if variant == "base" else encoder["hidden_size"]
    rank = 4 if variant == "faceid" else 0
    spec = make_spec(variant, unet_config, image_feature_dim=width, lora_rank=rank, name=f"tiny-{variant}")
    image_proj = build_image_proj(spec, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    cross = spec.cross_attention_dim

    def random(rows: int, cols: int):
        return jnp.asarray(rng.standard_normal((rows, cols)).astype(np.float32) / np.sqrt(rows))

    def kernels():
        return tuple(random(cross, h) for h in spec.layer_hidden_sizes)

    lora = {}
    for attn2, hidden in zip(spec.layer_paths, spec.layer_hidden_sizes, strict=True) if rank else ():
        for attn, context in ((attn2.removesuffix("attn2") + "attn1", hidden), (attn2, cross)):
            for target, fan_in in (("to_q", hidden), ("to_k", context), ("to_v", context), ("to_out", hidden)):
                lora[f"{attn}.{target}"] = (random(fan_in, rank), random(rank, hidden) * 0.1)
    adapter = IPAdapter(spec, image_proj, kernels(), kernels(), lora)
    return export_ip_adapter(adapter, path, overwrite=True)
