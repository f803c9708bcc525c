"""The platform a model is compiled for, applied to a built model as static choices (house rule 11).

The target is the platform of the devices the program runs on (`platform_of(mesh)`), which is not the host's
`jax.default_backend()`: a CPU host traces and compiles programs for TPU slices. `set_target` fixes, on every
module of a built model, the choices that depend on it: each attention module's `AttentionPolicy`, each
convolution's CPU-only paths (`Conv2d.for_cpu`), and the TPU backwards of the feed-forwards
(`GEGLU.recompute_gate`; on chips that keep tokens in the lanes, `BasicTransformerBlock.fused_feed_forward_grad`:
the feed-forward branch's input gradient as one kernel, `models/pallas_feed_forward.py`) and normalizations
(`GroupNorm`/`LayerNorm.recompute_normalized`, which on TPU also take the statistics of 16-bit inputs in one
pass). They are static attributes, part of the graph, as a remat policy is.
A model built with no target (`None`) takes the portable XLA paths everywhere.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.attention_policy import PLATFORMS, AttentionPolicy


def platform_of(mesh_or_devices) -> str:
    """"cpu", "gpu" or "tpu": the platform of a mesh's (or a device list's) devices."""
    devices = getattr(mesh_or_devices, "devices", mesh_or_devices)  # a Mesh's device grid, or a device list
    platforms = {d.platform for d in np.asarray(devices, dtype=object).flat}
    if len(platforms) != 1:
        raise ConfigError(f"the devices span several platforms ({', '.join(sorted(platforms))}); use one kind.")
    platform = platforms.pop()
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    if platform not in PLATFORMS:
        raise ConfigError(f"platform {platform!r} is not supported; use one of {', '.join(PLATFORMS)}.")
    return platform


# TPU chips whose programs keep the Pallas kernels' heads as rows where the tokens layout (below) does not apply
# (keys longer than one block). Compiled whole, every v5p program estimates rows faster than lanes (SD1.5
# training at 2 and 8 per chip, SDXL training at 1, SDXL generation at 2: 107.0 against 113.4 ms), every v5e
# and v6e program lanes (SDXL generation on v5e 226.4 against 242.7 ms, on v6e 69.4 against 81.2; SD1.5
# generation on v5e; SD1.5 and SDXL training on v5e-256), bench/tpu_notes.md. Other chips take lanes, which
# every chip estimates faster per kernel call.
ROWS_CHIPS = ("v5p",)
# Chips whose training steps keep the softmax probabilities of long self-attention (at most
# pallas_attention.STORED_PROBS_MAX_KEYS keys) from the forward for the backward, instead of recomputing q k^T
# and exp there: rows chips only (the lanes kernels always recompute). v5p has the HBM for them (SD1.5 at 8 per
# chip keeps 2 GiB per 64x64 layer) and the compiler estimates the step faster (bench/tpu_notes.md).
STORED_PROBS_CHIPS = ("v5p",)
# Chips whose programs run self-attention with keys up to pallas_attention.STORED_PROBS_MAX_KEYS through the
# tokens-in-lanes kernels (models/pallas_tokens.py), the layout XLA keeps the projections in: no transposes around
# the kernels. The SD1.5 training step at 32 per chip on v5p estimates 228.2 against 239.0 ms with rows
# (bench/tpu_notes.md).
TOKENS_CHIPS = ("v5p",)
_CHIPS = {"tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v6 lite": "v6e", "tpu v6e": "v6e", "tpu v5": "v5p",
          "tpu v5p": "v5p", "tpu v4": "v4"}


def chip_of(mesh_or_devices) -> str | None:
    """The TPU generation of a mesh's (or a device list's) chips ("v4", "v5e", "v5p", "v6e"), None for other
    devices and unknown kinds (libtpu's compile-only devices report the same kinds as real ones)."""
    devices = getattr(mesh_or_devices, "devices", mesh_or_devices)
    kinds = {str(getattr(d, "device_kind", "")).lower() for d in np.asarray(devices, dtype=object).flat}
    return _CHIPS.get(kinds.pop()) if len(kinds) == 1 else None


def set_target(root: nnx.Module, platform: str | None, *, chip: str | None = None) -> None:
    """Make every target-dependent choice of `root`'s modules for `platform` (before `nnx.split`); a TPU `chip`
    (`chip_of(mesh)`) picks the attention kernels' layout (tokens in the lanes on `TOKENS_CHIPS` where the keys fit
    one block, heads as rows on `ROWS_CHIPS`, in the lanes elsewhere) and whether their backward reads stored
    probabilities (`STORED_PROBS_CHIPS`); on TPU the feed-forwards' and normalizations' backwards recompute what
    XLA would otherwise keep in HBM (the gate's CDF, the normalized input), the normalizations take the
    statistics of 16-bit inputs in one read, and on `TOKENS_CHIPS` the feed-forward branch's input gradient is
    one kernel that never writes d(h, gate) to HBM."""
    if platform is not None and platform not in PLATFORMS:
        raise ConfigError(f"platform {platform!r} is unknown; use one of {', '.join(PLATFORMS)}.")
    from ipadapter_jax.models.layers import Conv2d, GroupNorm, LayerNorm
    from ipadapter_jax.models.transformer import GEGLU, BasicTransformerBlock

    cpu = platform == "cpu"
    tpu = platform == "tpu"
    lanes = chip not in ROWS_CHIPS
    store_probs = chip in STORED_PROBS_CHIPS
    tokens = chip in TOKENS_CHIPS
    # Assign only what changes: a module attribute assignment runs flax's checks, and a model built for the mesh's
    # platform (as loads do) then costs one walk over its modules.
    for _, module in nnx.iter_modules(root):
        if isinstance(module, Conv2d) and module.for_cpu != cpu:
            module.for_cpu = cpu
        if isinstance(module, GEGLU) and module.recompute_gate != tpu:
            module.recompute_gate = tpu
        if isinstance(module, BasicTransformerBlock) and module.fused_feed_forward_grad != (tpu and tokens):
            module.fused_feed_forward_grad = tpu and tokens
        if isinstance(module, GroupNorm | LayerNorm) and module.recompute_normalized != tpu:
            module.recompute_normalized = tpu
        policy = getattr(module, "attention_impl", None)
        if isinstance(policy, AttentionPolicy) and (
                (policy.platform, policy.lanes, policy.store_probs, policy.tokens)
                != (platform, lanes, store_probs, tokens)):
            module.attention_impl = policy.for_platform(platform, lanes=lanes, store_probs=store_probs, tokens=tokens)
