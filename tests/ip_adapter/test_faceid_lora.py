"""FaceID: the LoRA carried in the file (all processors, attn1 even / attn2 odd) merged into the UNet gives the
official un-merged `to_x(h) + lora_scale * to_x_lora(h)` (diffusers' LoRALinearLayer, as the official code uses)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from reference_models import SD1_UNET, official_ip_adapter, rel_err, save_official_ip_adapter, save_unet

from ipadapter_jax.ip_adapter import attach, merge_faceid_lora
from ipadapter_jax.models.ip_conditioning import IPConditioning
from ipadapter_jax.models.unet import cross_attentions
from ipadapter_jax.weights.diffusers_models import load_unet
from ipadapter_jax.weights.ip_adapter_files import load_ip_adapter

LORA_SCALE = 0.8


def _wrap_with_lora(torch, ref, state):
    from diffusers.models.lora import LoRALinearLayer

    class WithLoRA(torch.nn.Module):
        def __init__(self, base, lora):
            super().__init__()
            self.base, self.lora = base, lora

        def forward(self, x, *args, **kwargs):
            return self.base(x) + LORA_SCALE * self.lora(x)

    ip = state["ip_adapter"]
    for index, name in enumerate(ref.attn_processors):
        attn = ref.get_submodule(name.removesuffix(".processor"))
        for target in ("to_q", "to_k", "to_v", "to_out"):
            base = attn.to_out[0] if target == "to_out" else getattr(attn, target)
            down, up = ip[f"{index}.{target}_lora.down.weight"], ip[f"{index}.{target}_lora.up.weight"]
            lora = LoRALinearLayer(base.in_features, base.out_features, rank=down.shape[0])
            with torch.no_grad():
                lora.down.weight.copy_(down)
                lora.up.weight.copy_(up)
            if target == "to_out":
                attn.to_out[0] = WithLoRA(base, lora)
            else:
                setattr(attn, target, WithLoRA(base, lora))


def test_faceid_with_merged_lora_matches_official_formula(tmp_path, torch):
    ref = save_unet(tmp_path / "unet", SD1_UNET)
    state = official_ip_adapter(ref, "faceid", tokens=4, lora_rank=4, face_dim=16, seed=11)
    path = save_official_ip_adapter(state, tmp_path / "ip-adapter-faceid.bin")
    ref._load_ip_adapter_weights([state], low_cpu_mem_usage=False)  # to_k_ip/to_v_ip + projection, no PEFT
    _wrap_with_lora(torch, ref, state)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, SD1_UNET["cross_attention_dim"])).astype(np.float32)
    face = np.concatenate([np.zeros((1, 16)), rng.standard_normal((1, 16))]).astype(np.float32)  # CFG pair
    t = np.array([10, 700])
    with torch.no_grad():
        expected = ref(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                       added_cond_kwargs={"image_embeds": [torch.tensor(face)[:, None]]}).sample.numpy()

    unet = load_unet(tmp_path / "unet", num_ip_adapters=1)
    before = np.asarray(cross_attentions(unet)[0].to_q.kernel[...])
    adapter = load_ip_adapter(path, unet_config=tmp_path / "unet")
    assert adapter.spec.variant == "faceid" and adapter.spec.lora_rank == 4
    assert merge_faceid_lora(unet, adapter, LORA_SCALE) == 4 * 2 * unet.num_ip_layers
    attach(unet, [adapter])
    tokens = adapter.tokens(face_embeds=jnp.asarray(face)[:, None])
    ip = IPConditioning(tokens=(tokens,), scales=(jnp.ones((unet.num_ip_layers,)),), masks=(None,))
    forward = nnx.jit(lambda m, x, t, c, ip: m(x, t, c, ip=ip))
    got = np.asarray(forward(unet, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx), ip))
    err = rel_err(got.transpose(0, 3, 1, 2), expected)
    print(f"faceid + merged LoRA: UNet rel err {err:.2e}")
    assert err < 1e-5

    merge_faceid_lora(unet, adapter, -LORA_SCALE)  # undo
    np.testing.assert_allclose(np.asarray(cross_attentions(unet)[0].to_q.kernel[...]), before, atol=1e-6)
