"""Run by tests/planning/test_tpu_plan.py with the TPU virtualenv's python (libtpu installed): lower a tiny
TPU-targeted UNet gradient, plan a tiny training step (data mesh, fsdp mesh, `mesh: auto`) and batch-generation
step (fsdp mesh) for a v5e:2x2 slice, and print each result as one JSON line."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

TINY_UNET = {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
             "attention_head_dim": 2, "cross_attention_dim": 32, "norm_num_groups": 8, "sample_size": 32}
TINY_ENCODER = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 24, "image_size": 32,
                "patch_size": 8}
# 256 x 256 images: 32 x 32 latents, whose 1024-token self-attention is where `auto` picks the Pallas kernels
# (the generation step, and hlo_check's gradient). The TPU compiler's time grows with the sizes (a tiny train
# step with lanes kernels: 28 s at 256 x 256, 14 s at 128 x 128), so the training steps compile at 128 x 128,
# with the kernels asked for by name.
RESOLUTION, SMALL = 256, 128


def write_base(root: Path) -> Path:
    """A diffusers-style folder with only the configs the planner reads (no weights)."""
    configs = {"unet/config.json": TINY_UNET, "vae/config.json": {"block_out_channels": [8, 8, 8, 8]},
               "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                                                   "beta_start": 0.00085, "beta_end": 0.012},
               "image_encoder/config.json": TINY_ENCODER}
    for name, value in configs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(value))
    return root


def hlo_check(topology: str) -> dict:
    """A tiny UNet's training gradient built for TPU and lowered for one chip of the slice: which paths its HLO
    holds (the CPU-only ones are named scopes, `models/attention.py` and `models/conv.py`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ipadapter_jax.models.layers import abstract_model
    from ipadapter_jax.models.target import chip_of
    from ipadapter_jax.models.unet import UNet2DConditionModel
    from ipadapter_jax.models.unet_config import UNetConfig
    from ipadapter_jax.planning import parse_topology

    config = UNetConfig.from_dict({**TINY_UNET, "block_out_channels": [32, 64, 128],
                                   "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                                   "up_block_types": ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]})
    unet = abstract_model(lambda: UNet2DConditionModel(config, platform="tpu", dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(unet)
    one = NamedSharding(jax.sharding.Mesh(parse_topology(topology).devices()[:1], ("data",)), P())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)

    def loss(x, state):
        out = nnx.merge(graphdef, state)(x, jnp.int32(3), jnp.zeros((1, 77, 32), jnp.bfloat16))
        return jnp.sum(out.astype(jnp.float32))

    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.bfloat16, sharding=one)
    text = jax.jit(jax.grad(loss)).lower(x, state).as_text(debug_info=True)
    chips = {t: chip_of(parse_topology(t).devices()) for t in ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")}
    return {"job": "hlo", "chips": chips,
            **{k: text.count(k) for k in ("tpu_custom_call", "cpu_chunked_attention", "cpu_gemm_conv")}}


def kernel_check(job: str, shape: tuple[int, ...], **kwargs) -> dict:
    """Our attention kernels for SD1.5's 40-wide heads compiled by Mosaic for one v5p chip, forward and backward:
    "lanes" (B, L, H*D), or "probs" (rows, P stored for the backward: a whole 4096-key row per forward block)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ipadapter_jax.models.pallas_attention import KERNEL_NAMES, flash_attention
    from ipadapter_jax.planning import parse_topology

    one = NamedSharding(jax.sharding.Mesh(parse_topology("v5p:2x2x1").devices()[:1], ("data",)), P())
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=one)
    grad = jax.grad(lambda q, k, v: jnp.sum(flash_attention(q, k, v, **kwargs).astype(jnp.float32)), (0, 1, 2))
    compiled = jax.jit(grad).lower(x, x, x).compile()
    text = compiled.as_text()
    return {"job": job, "optimal_seconds": compiled.cost_analysis()["optimal_seconds"],
            "kernels": sorted({n for n in KERNEL_NAMES if n in text}),
            "transposes": text.count(" transpose(")}


def layout_check(job: str, shape: tuple[int, ...], **kwargs) -> dict:
    """One SD1.5-width attention block for one v5p chip, as the UNet runs it (q, k, v projections, attention, output
    projection), differentiated: the compiler's layout copies (transposes) around our kernels, by its own cycles."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ipadapter_jax.models.pallas_attention import KERNEL_NAMES, flash_attention
    from ipadapter_jax.planning import parse_topology
    from ipadapter_jax.planning.ops import op_costs

    b, l, h, d = shape

    def block(x, wq, wk, wv, wo):
        heads = [(x @ w).reshape(b, l, h, d) for w in (wq, wk, wv)]
        return jnp.sum((flash_attention(*heads, **kwargs).reshape(b, l, h * d) @ wo).astype(jnp.float32) ** 2)

    one = NamedSharding(jax.sharding.Mesh(parse_topology("v5p:2x2x1").devices()[:1], ("data",)), P())
    x = jax.ShapeDtypeStruct((b, l, h * d), jnp.bfloat16, sharding=one)
    w = jax.ShapeDtypeStruct((h * d, h * d), jnp.bfloat16, sharding=one)
    text = jax.jit(jax.grad(block, (0, 1))).lower(x, w, w, w, w).compile().as_text()
    ops = [o for o in op_costs(text) if o.cycles > 0]
    return {"job": job, "kernels": sorted({n for n in KERNEL_NAMES if n in text}),
            "copy_cycles": sum(o.cycles for o in ops if o.kind == "copy"), "cycles": sum(o.cycles for o in ops)}


def roofline_check(topology: str) -> dict:
    """A differentiated attention block (projections, the tokens kernels, the output projection) for one chip of
    the slice: the compiler's `optimal_seconds` against planning/ops.py's sum of per-operation rooflines, with the
    kernels at their declared costs, both at the rates `Chip` records for this libtpu."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ipadapter_jax.models.pallas_attention import flash_attention
    from ipadapter_jax.planning import parse_topology
    from ipadapter_jax.planning.ops import op_costs, roofline_seconds, unpriced_joins
    from ipadapter_jax.planning.report import kernel_costs

    b, l, h, d = 8, 4096, 8, 40  # SD1.5 at 64x64 latents, 8 per chip: the sizes the plans price

    def block(x, wq, wk, wv, wo):
        heads = [jax.nn.gelu(x @ w).reshape(b, l, h, d) for w in (wq, wk, wv)]
        return jnp.sum((flash_attention(*heads, tokens=True).reshape(b, l, h * d) @ wo).astype(jnp.float32) ** 2)

    slice_ = parse_topology(topology)
    one = NamedSharding(jax.sharding.Mesh(slice_.devices()[:1], ("data",)), P())
    x = jax.ShapeDtypeStruct((b, l, h * d), jnp.bfloat16, sharding=one)
    w = jax.ShapeDtypeStruct((h * d, h * d), jnp.bfloat16, sharding=one)
    compiled = jax.jit(jax.grad(block, (0, 1))).lower(x, w, w, w, w).compile()
    text = compiled.as_text()
    chip = slice_.chip
    kernels = sum(roofline_seconds(k.flops, k.bytes, chip) for k in kernel_costs(text).values())
    xla = sum(o.seconds(chip) for o in op_costs(text) if o.kind != "kernel")
    return {"job": "roofline", "chip": chip.name, "kernel_seconds": kernels, "modeled_seconds": kernels + xla,
            "optimal_seconds": compiled.cost_analysis()["optimal_seconds"] + unpriced_joins(text)}


def joins_check(topology: str) -> dict:
    """Eight 1280x1280 bfloat16 matrix products for one chip of the slice: on v5e the compiler prefetches a weight
    in row slices joined by a `ConcatBitcast`, which its cost model prices at -1 s; planning/ops.py counts them."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ipadapter_jax.planning import parse_topology
    from ipadapter_jax.planning.ops import unpriced_joins

    def chain(weights, x):
        for w in weights:
            x = jax.nn.gelu(x @ w)
        return x

    one = NamedSharding(jax.sharding.Mesh(parse_topology(topology).devices()[:1], ("data",)), P())
    weights = [jax.ShapeDtypeStruct((1280, 1280), jnp.bfloat16, sharding=one)] * 8
    compiled = jax.jit(chain).lower(weights, jax.ShapeDtypeStruct((4096, 1280), jnp.bfloat16, sharding=one)).compile()
    cost = compiled.cost_analysis()
    return {"job": "joins", "optimal_seconds": cost["optimal_seconds"], "flops": cost["flops"],
            "joins": unpriced_joins(compiled.as_text())}


def feed_forward_check() -> dict:
    """SD1.5's 64x64 feed-forward branch (x + FF(LayerNorm(x)), GEGLU) for one v5p chip at 8 per chip, its input
    gradient with the weights frozen: through the branch's kernel (models/pallas_feed_forward.py) and through XLA's
    TPU backward (the v6e choice: LayerNorm and GEGLU recomputing), by the compiler's estimate."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ipadapter_jax.models.attention_policy import AttentionPolicy
    from ipadapter_jax.models.pallas_feed_forward import KERNEL_NAME
    from ipadapter_jax.models.target import set_target
    from ipadapter_jax.models.transformer import BasicTransformerBlock
    from ipadapter_jax.planning import parse_topology

    one = NamedSharding(jax.sharding.Mesh(parse_topology("v5p:2x2x1").devices()[:1], ("data",)), P())
    x = jax.ShapeDtypeStruct((8, 4096, 320), jnp.bfloat16, sharding=one)
    out = {"job": "feed forward"}
    for name, chip in (("kernel", "v5p"), ("xla", "v6e")):
        block = BasicTransformerBlock(320, 8, 40, cross_attention_dim=768, only_cross_attention=False,
                                      num_ip_adapters=0, ip_layer=0, attention_impl=AttentionPolicy(),
                                      dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        set_target(block, "tpu", chip=chip)
        graphdef, state = nnx.split(block)
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), state)

        def loss(x, state, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state)._feed_forward_branch(x).astype(jnp.float32) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(x, state).compile()
        out[name] = {"optimal_seconds": compiled.cost_analysis()["optimal_seconds"],
                     "kernel": KERNEL_NAME in compiled.as_text()}
    return out


def main(topology: str) -> None:
    from ipadapter_jax.planning import GenerateSettings, plan_generate, plan_train
    from ipadapter_jax.planning.report import dumps
    from ipadapter_jax.training.config import load_train_config

    print(json.dumps(hlo_check(topology)), flush=True)
    print(json.dumps(kernel_check("lanes", (2, 1024, 8, 40), lanes=True)), flush=True)
    print(json.dumps(kernel_check("probs", (1, 4096, 2, 40), pad_head=False, store_probs=True)), flush=True)
    print(json.dumps(joins_check(topology)), flush=True)
    print(json.dumps(feed_forward_check()), flush=True)
    for chip in ("v5p:2x2x1", "v5e:2x2", "v6e:2x2"):
        print(json.dumps(roofline_check(chip)), flush=True)
    for job, kwargs in (("block rows", dict(pad_head=False, store_probs=True)), ("block tokens", dict(tokens=True))):
        print(json.dumps(layout_check(job, (2, 1024, 8, 40), **kwargs)), flush=True)
    root = write_base(Path(tempfile.mkdtemp()))
    # `mesh: auto` with a global batch (2) that does not split over the 4 chips (the pick: a data mesh), under
    # remat; then data x fsdp (the UNet split) without
    for fsdp, mesh, remat, batch in ((1, "mesh=auto", "dots_no_batch", 2), (2, "mesh.fsdp=2", "none", 8)):
        config = load_train_config(None, [f"model.base={root}", f"model.image_encoder={root / 'image_encoder'}",
                                          "model.variant=base", "model.dtype=bfloat16", f"data.resolution={SMALL}",
                                          f"global_batch_size={batch}", "total_steps=1000", mesh,
                                          f"model.remat={remat}", "model.attention=pallas"])
        print(json.dumps({"job": "train", "fsdp": fsdp, "resolution": SMALL,
                          **json.loads(dumps(plan_train(config, topology)))}), flush=True)
    settings = GenerateSettings(height=RESOLUTION, width=RESOLUTION, steps=20, batch_per_chip=1, adapter="plus",
                                fsdp=2)
    estimate = plan_generate(str(root), settings, topology, str(root / "image_encoder"))
    print(json.dumps({"job": "generate", "fsdp": 2, "resolution": RESOLUTION, **json.loads(dumps(estimate))}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "v5e:2x2")
