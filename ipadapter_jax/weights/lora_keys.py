"""How LoRA files name the layers they adapt, and finding those layers in our models.

Two families of names:
- diffusers/PEFT: `unet.<module path>.lora_A.weight` / `.lora_B.weight`, the older `.lora.down/up.weight`,
  `.lora_linear_layer.down/up.weight` and attention-processor `<attn>.processor.to_q_lora.down.weight` forms,
  prefixed `unet.`, `text_encoder.` or `text_encoder_2.`. Module paths are diffusers' and transformers', which ours
  mirror, so they resolve by exact lookup.
- kohya/A1111: `lora_unet_<path with underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`, with
  `lora_te_`/`lora_te1_`/`lora_te2_` for the text encoders. Underscores are resolved against the actual module
  tree: every adaptable layer's path (and, for the UNet, its name in the original SGM/LDM UNet, which kohya uses
  for SDXL: `input_blocks.4.1...`) is spelled with underscores, and a name two layers share is ambiguous.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from ipadapter_jax.models.layers import Conv2d, IPAdapterParam, Linear

TARGETS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
          ("lora_te_", "text_encoder"))
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DIFFUSERS_PARTS = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                    (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                    (".lora_linear_layer.up.weight", "up"), ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
                    (".alpha", "alpha"))
# Attention-processor names of the old diffusers format: (UNet module, CLIP module).
_PROCESSOR = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"), "to_v": ("to_v", "v_proj"),
              "to_out": ("to_out.0", "out_proj")}
# Other LoRA-like methods, recognised only to name them in the error.
UNSUPPORTED = {"lora_magnitude_vector": "DoRA", "dora_scale": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
               "lora_mid": "LoCon with a CP-decomposed middle (lora_mid)", "lora_B.bias": "LoRA with biases",
               "lora_up.bias": "LoRA with biases", "diff": "full weight differences", "oft_": "OFT",
               "boft_": "BOFT", "ia3_": "IA3"}


@dataclasses.dataclass(frozen=True)
class KeyRef:
    target: str  # "unet", "text_encoder" or "text_encoder_2"
    module: str  # dotted module path (diffusers/PEFT files) or the underscore name (kohya files)
    part: str  # "down", "up" or "alpha"
    kohya: bool


def parse_key(key: str) -> KeyRef | None:
    """What a LoRA checkpoint key adapts, or None for a key no supported format has."""
    for prefix, target in _KOHYA:
        if key.startswith(prefix):
            name, _, tail = key[len(prefix):].partition(".")
            part = _KOHYA_PARTS.get(tail)
            return KeyRef(target, name, part, True) if part and name else None
    target = "unet"
    for candidate in TARGETS[::-1]:  # text_encoder_2 before text_encoder
        if key.startswith(candidate + "."):
            target, key = candidate, key[len(candidate) + 1:]
            break
    key = key.replace(".processor.", ".")
    for suffix, part in _DIFFUSERS_PARTS:
        if key.endswith(suffix) and len(key) > len(suffix):
            module = key[: -len(suffix)]
            if suffix.startswith("_lora."):  # <attn>.to_q_lora.down.weight -> <attn>.to_q / <attn>.q_proj
                parent, _, name = module.rpartition(".")
                if name not in _PROCESSOR or not parent:
                    return None
                module = f"{parent}.{_PROCESSOR[name][target != 'unet']}"
            return KeyRef(target, module, part, False)
    return None


def unsupported_method(key: str) -> str | None:
    return next((method for marker, method in UNSUPPORTED.items() if marker in key), None)


def _resnet_sgm(prefix: str) -> dict[str, str]:
    names = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
             "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    return {f"{prefix}.{ours}": theirs for ours, theirs in names.items()}


def sgm_names(unet) -> dict[str, str]:
    """Our UNet module path prefix -> its name in the original SGM/LDM UNet (`input_blocks.N.M`, ...)."""
    out = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}

    def resnet(ours: str, theirs: str):
        out[ours] = theirs
        out.update({k: f"{theirs}.{v}" for k, v in _resnet_sgm(ours).items()})

    n = 1
    for b, block in enumerate(unet.down_blocks):
        for k in range(len(block.resnets)):
            resnet(f"down_blocks.{b}.resnets.{k}", f"input_blocks.{n}.0")
            if len(block.attentions):
                out[f"down_blocks.{b}.attentions.{k}"] = f"input_blocks.{n}.1"
            n += 1
        if len(block.downsamplers):
            out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    resnet("mid_block.resnets.0", "middle_block.0")
    out["mid_block.attentions.0"] = "middle_block.1"
    resnet("mid_block.resnets.1", "middle_block.2")
    n = 0
    for b, block in enumerate(unet.up_blocks):
        for k in range(len(block.resnets)):
            resnet(f"up_blocks.{b}.resnets.{k}", f"output_blocks.{n}.0")
            if len(block.attentions):
                out[f"up_blocks.{b}.attentions.{k}"] = f"output_blocks.{n}.1"
            n += 1
        if len(block.upsamplers):  # in the block's last entry, after the resnet and (if any) the attention
            out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{n - 1}.{2 if len(block.attentions) else 1}.conv"
    return out


def sgm_name(path: str, table: dict[str, str]) -> str | None:
    """A module path's SGM/LDM name, from `sgm_names` of its UNet (None outside the table)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return ".".join([table[prefix], *parts[cut:]])
    return None


@dataclasses.dataclass
class ModuleIndex:
    """A model's adaptable layers (Linear and Conv2d) by dotted path, with the other spellings files use."""

    modules: dict[str, nnx.Module]  # dotted path -> layer
    dotted: dict[str, str]  # a diffusers/PEFT module name -> dotted path
    kohya: dict[str, str | None]  # underscore name -> dotted path; None where two layers share the name

    def resolve(self, ref: KeyRef) -> str | None:
        """The dotted path of the layer a key names; None if no layer, "" if the kohya name is ambiguous."""
        if not ref.kohya:
            return self.dotted.get(ref.module)
        if ref.module not in self.kohya:
            return None
        return self.kohya[ref.module] or ""


def module_index(model: nnx.Module, target: str) -> ModuleIndex:
    modules, dotted_names, kohya = {}, {}, {}
    sgm = sgm_names(model) if target == "unet" else {}
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, Linear | Conv2d) or isinstance(module.kernel, IPAdapterParam):
            continue
        dotted = ".".join(map(str, path))
        modules[dotted] = module
        names = {dotted}
        if sgm:
            names.add(sgm_name(dotted, sgm))
        if dotted.startswith("text_model."):  # transformers 5 saves a bare CLIPTextModel without it
            names.add(dotted.removeprefix("text_model."))
        for name in names - {None}:
            dotted_names.setdefault(name, dotted)
            underscored = name.replace(".", "_")
            kohya[underscored] = None if kohya.get(underscored, dotted) != dotted else dotted
    return ModuleIndex(modules, dotted_names, kohya)
