"""UNet parity with diffusers (float32, CPU) on tiny random checkpoints, with and without IP-Adapter tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_models import SD1_UNET, SD2_UNET, SDXL_UNET, rel_err, save_unet

from ipadapter_jax.models.ip_conditioning import IPConditioning
from ipadapter_jax.models.unet import cross_attentions
from ipadapter_jax.weights.diffusers_models import load_unet

CONFIGS = {"sd1": SD1_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET}


def _inputs(cfg, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((batch, 7, cfg["cross_attention_dim"])).astype(np.float32)
    t = np.array([10, 700][:batch])
    added = {}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {"text_embeds": rng.standard_normal((batch, pooled)).astype(np.float32),
                 "time_ids": np.tile(np.array([[64, 48, 0, 8, 64, 64]], np.float32), (batch, 1))}
    return x, t, ctx, added


def _run_torch(ref, x, t, ctx, added, **kw):
    import torch

    with torch.no_grad():
        tensors = {k: torch.tensor(v) for k, v in added.items()}
        return ref(torch.tensor(x), torch.tensor(t), ctx, added_cond_kwargs=tensors or None, **kw).sample.numpy()


def _run_ours(unet, x, t, ctx, added, ip=None):
    graphdef, state = nnx.split(unet)

    @jax.jit
    def forward(state, x, t, ctx, added, ip):
        return nnx.merge(graphdef, state)(x, t, ctx, ip=ip, **added)

    out = forward(state, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx),
                  {k: jnp.asarray(v) for k, v in added.items()}, ip)
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet_matches_diffusers(tmp_path, torch, name):
    cfg = CONFIGS[name]
    ref = save_unet(tmp_path, cfg)
    x, t, ctx, added = _inputs(cfg)
    expected = _run_torch(ref, x, t, torch.tensor(ctx), added)
    ours = _run_ours(load_unet(tmp_path), x, t, ctx, added)
    assert rel_err(ours, expected) < 1e-5


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_unet_with_two_ip_adapters_matches_diffusers(tmp_path, torch, name):
    """Two adapters of 4 and 3 tokens, per-layer scales: diffusers' IPAdapterAttnProcessor2_0 is the reference."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    cfg = CONFIGS[name]
    ref = save_unet(tmp_path, cfg)
    unet = load_unet(tmp_path, num_ip_adapters=2)
    layers = cross_attentions(unet)
    rng = np.random.default_rng(1)
    scales = rng.uniform(0.2, 1.5, size=(2, len(layers))).astype(np.float32)
    processors = {}
    for name_, proc in ref.attn_processors.items():
        if not name_.endswith("attn2.processor"):
            processors[name_] = AttnProcessor2_0()
            continue
        module = ref.get_submodule(name_.removesuffix(".processor"))
        index = next(i for i, m in enumerate(layers) if _path_of(unet, m) == name_.removesuffix(".processor"))
        proc = IPAdapterAttnProcessor2_0(module.to_q.out_features, cfg["cross_attention_dim"], num_tokens=(4, 3),
                                         scale=[float(scales[0, index]), float(scales[1, index])])
        gen = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for lin in [*proc.to_k_ip, *proc.to_v_ip]:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.2)
        for a in range(2):
            layers[index].to_k_ip[a].kernel.set_value(jnp.asarray(proc.to_k_ip[a].weight.detach().numpy().T))
            layers[index].to_v_ip[a].kernel.set_value(jnp.asarray(proc.to_v_ip[a].weight.detach().numpy().T))
        processors[name_] = proc
    ref.set_attn_processor(processors)

    x, t, ctx, added = _inputs(cfg)
    tokens = [rng.standard_normal((2, 1, n, cfg["cross_attention_dim"])).astype(np.float32) for n in (4, 3)]
    expected = _run_torch(ref, x, t, (torch.tensor(ctx), [torch.tensor(tk) for tk in tokens]), added)
    ip = IPConditioning(tokens=tuple(jnp.asarray(tk) for tk in tokens),
                        scales=(jnp.asarray(scales[0]), jnp.asarray(scales[1])), masks=(None, None))
    ours = _run_ours(unet, x, t, ctx, added, ip)
    assert rel_err(ours, expected) < 1e-5
    base = _run_ours(unet, x, t, ctx, added)
    assert rel_err(ours, base) > 1e-2  # the image branch really acts


def _path_of(root, target) -> str:
    return next(".".join(map(str, p)) for p, m in nnx.iter_modules(root) if m is target)


def test_scale_zero_or_no_adapter_equals_base_model_exactly(tmp_path, torch):
    save_unet(tmp_path, SD1_UNET)
    x, t, ctx, added = _inputs(SD1_UNET)
    base = _run_ours(load_unet(tmp_path), x, t, ctx, added)
    with_slot = load_unet(tmp_path, num_ip_adapters=1)
    tokens = jnp.ones((2, 1, 4, SD1_UNET["cross_attention_dim"]))
    zero = IPConditioning(tokens=(tokens,), scales=(jnp.zeros(with_slot.num_ip_layers),), masks=(None,))
    np.testing.assert_array_equal(_run_ours(with_slot, x, t, ctx, added, zero), base)
    np.testing.assert_array_equal(_run_ours(with_slot, x, t, ctx, added), base)


def test_ip_layer_numbering_follows_official_order(tmp_path, torch):
    save_unet(tmp_path, SDXL_UNET)
    unet = load_unet(tmp_path, num_ip_adapters=1)
    paths = [_path_of(unet, m) for m in cross_attentions(unet)]
    assert paths == [layer.path for layer in unet.config.cross_attention_layers()]
    assert paths[0].startswith("down_blocks.1") and paths[-1].startswith("mid_block")
    assert [m.ip_layer for m in cross_attentions(unet)] == list(range(unet.num_ip_layers))
