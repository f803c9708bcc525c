"""LoRA files fused into the base model: parity with diffusers' `load_lora_weights` + `fuse_lora` on the tiny
SD1.5 and SDXL pipelines (every fused weight, the UNet output and the text encoders' outputs), the kohya alpha
rule per layer, several files and dtypes/sharding, and the errors that name a bad key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_models import rel_err

from ipadapter_jax.errors import UserError
from ipadapter_jax.models.layers import Linear
from ipadapter_jax.tiny_models import write_tiny_lora, write_tiny_pipeline
from ipadapter_jax.weights.checkpoint_files import open_file
from ipadapter_jax.weights.diffusers_models import load_text_encoder, load_unet
from ipadapter_jax.weights.lora import fuse_loras, read_lora
from ipadapter_jax.weights.lora_keys import module_index, parse_key
from ipadapter_jax.weights.torch_layout import export_state

SCALE = 0.7
TOL = 1e-5
# Module-level, so tests of the same architecture reuse one compilation.
_unet_forward = nnx.jit(lambda unet, x, t, ctx, added: unet(x, t, ctx, **added))
_text_forward = nnx.jit(lambda encoder, ids: encoder(ids))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {kind: write_tiny_pipeline(root / kind, kind) for kind in ("sd15", "sdxl")}


def _ours(folder, kind, dtype="float32"):
    unet = load_unet(folder / "unet", dtype=dtype)
    encoders = [load_text_encoder(folder / "text_encoder", dtype=dtype)]
    if kind == "sdxl":
        encoders.append(load_text_encoder(folder / "text_encoder_2", dtype=dtype))
    return unet, encoders


def _diffusers(folder, kind, lora):
    import diffusers

    if kind == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT wrappers
    return pipe


def _torch_state(module):
    return {k.removeprefix("text_model."): v.detach().numpy() for k, v in module.state_dict().items()}


def _unet_inputs(unet, seed=0):
    rng = np.random.default_rng(seed)
    c = unet.config
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, c.context_dim)).astype(np.float32)
    added = {}
    if c.addition_embed_type:
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"text_embeds": rng.standard_normal((2, pooled)).astype(np.float32),
                 "time_ids": np.tile(np.float32([[64, 64, 0, 0, 64, 64]]), (2, 1))}
    return x, np.array([10, 700]), ctx, added


@pytest.mark.parametrize("style", ["peft", "diffusers-old", "kohya"])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_fused_lora_matches_diffusers(pipelines, torch, kind, style):
    pytest.importorskip("peft")  # diffusers' load_lora_weights needs its PEFT backend
    folder = pipelines[kind]
    # kohya: one alpha for all layers (diffusers applies per-layer alphas of attention and CLIP layers wrongly, see
    # test_kohya_alpha_per_layer); peft: alpha from lora_adapter_metadata.
    lora = write_tiny_lora(folder.parent / f"{kind}-{style}.safetensors", folder, style=style, rank=4,
                           alpha={"peft": 3.0, "kohya": 2.0}.get(style))
    pipe = _diffusers(folder, kind, lora)
    unet, encoders = _ours(folder, kind)
    before = export_state(unet)
    counts = fuse_loras(unet, encoders, [(lora, SCALE)])
    assert counts["unet"] == sum(1 for k in before if k.endswith("weight") and before[k].ndim in (2, 4))
    assert all(counts[t] == 12 for t in counts if t != "unet")  # 2 layers x (q, k, v, out, fc1, fc2)
    after = export_state(unet)
    assert min(rel_err(after[k], v) for k, v in before.items() if v.ndim in (2, 4)) > 1e-2  # every layer moved

    # Every weight: fused ones as diffusers fused them, the rest untouched.
    pairs = [(unet, pipe.unet), *zip(encoders, [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)],
                                      strict=False)]
    worst = 0.0
    for ours, ref in pairs:
        mine = {k.removeprefix("text_model."): v for k, v in export_state(ours).items()}
        theirs = _torch_state(ref)
        assert mine.keys() == theirs.keys()
        worst = max(worst, *(rel_err(mine[k], theirs[k]) for k in mine))
    assert worst < TOL, worst

    x, t, ctx, added = _unet_inputs(unet)
    with torch.no_grad():
        expected = pipe.unet(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t), torch.tensor(ctx),
                             added_cond_kwargs={k: torch.tensor(v) for k, v in added.items()} or None).sample.numpy()
    got = _unet_forward(unet, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                        {k: jnp.asarray(v) for k, v in added.items()})
    unet_err = rel_err(np.asarray(got).transpose(0, 3, 1, 2), expected)
    ids = np.array([[516, 40, 41, 42, 517] + [517] * 3, [516, 50, 517] + [517] * 5])
    text_errs = []
    for ours, ref in pairs[1:]:
        with torch.no_grad():
            out = ref(torch.tensor(ids), output_hidden_states=True)
        mine = _text_forward(ours, jnp.asarray(ids))
        text_errs.append(rel_err(mine.last_hidden_state, out.last_hidden_state.numpy()))
        text_errs.append(rel_err(mine.hidden_states[-2], out.hidden_states[-2].numpy()))
        if mine.text_embeds is not None:
            text_errs.append(rel_err(mine.text_embeds, out.text_embeds.numpy()))
    print(f"{kind}/{style}: weights {worst:.1e}, UNet {unet_err:.1e}, text encoders {max(text_errs):.1e}")
    assert unet_err < TOL and max(text_errs) < TOL


def _deltas(lora, weight, models):
    """weight * alpha / rank * up @ down per layer, straight from the file with numpy (PyTorch layout)."""
    out = {}
    for layer in read_lora(lora, models):
        delta = np.einsum("or,ri...->oi...", layer.up.astype(np.float64), layer.down.astype(np.float64))
        out[f"{layer.target}:{layer.path}.weight"] = weight * layer.scale * delta
    return out


def _kernels(models):
    return {f"{t}:{k}": v for t, m in models.items() for k, v in export_state(m).items()}


def test_kohya_alpha_per_layer_and_two_files_add_up(pipelines, tmp_path):
    folder = pipelines["sdxl"]
    varying = write_tiny_lora(tmp_path / "varying.safetensors", folder, style="kohya", seed=1)  # alphas 1, r/2, 2r
    state = open_file(varying)
    assert {float(state[k]) for k in state if k.endswith(".alpha")} == {1.0, 2.0, 8.0}
    other = write_tiny_lora(tmp_path / "other.safetensors", folder, style="peft", seed=2)
    unet, encoders = _ours(folder, "sdxl")
    models = {"unet": unet, "text_encoder": encoders[0], "text_encoder_2": encoders[1]}
    expected = _kernels(models)
    for lora, weight in ((varying, 0.8), (other, -0.5)):
        for key, delta in _deltas(lora, weight, models).items():
            expected[key] = expected[key] + delta
    fuse_loras(unet, encoders, [(varying, 0.8), (other, -0.5)])
    after = _kernels(models)
    worst = max(rel_err(after[k], v) for k, v in expected.items())
    assert worst < TOL, worst


def test_dtype_and_sharding_are_kept(pipelines, tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    folder = pipelines["sd15"]
    lora = write_tiny_lora(tmp_path / "lora.safetensors", folder, style="kohya", alpha=4.0)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("fsdp",))
    sharded = NamedSharding(mesh, PartitionSpec(None, "fsdp"))
    unet = load_unet(folder / "unet", dtype="bfloat16",
                     sharding=lambda path, shape: sharded if len(shape) == 2 and shape[1] % 8 == 0 else None)
    encoder = load_text_encoder(folder / "text_encoder", dtype="bfloat16")
    reference, _ = _ours(folder, "sd15")
    fuse_loras(reference, [load_text_encoder(folder / "text_encoder")], [(lora, 1.0)])
    fuse_loras(unet, [encoder], [(lora, 1.0)])
    q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel
    assert q.dtype == jnp.bfloat16 and q.get_value().sharding == sharded
    ref_q = reference.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel
    assert rel_err(np.float32(q.get_value()), ref_q.get_value()) < 1e-2  # bfloat16 rounding only


def test_peft_alpha_tensors_and_1x1_factors_for_linear_layers(pipelines):
    """Files outside diffusers' own writers: `.alpha` next to lora_A/B, and a Linear adapted by 1x1 conv factors."""
    unet, _ = _ours(pipelines["sdxl"], "sdxl")
    path = "down_blocks.1.attentions.0.proj_in"  # a Linear in SDXL (use_linear_projection)
    rng = np.random.default_rng(0)
    down, up = rng.standard_normal((2, 64, 1, 1)).astype(np.float32), rng.standard_normal((64, 2)).astype(np.float32)
    state = {f"unet.{path}.lora_A.weight": down, f"unet.{path}.lora_B.weight": up,
             f"unet.{path}.alpha": np.float32(1.0)}
    before = export_state(unet)[f"{path}.weight"]
    assert fuse_loras(unet, (), [(state, 0.5)]) == {"unet": 1}
    after = export_state(unet)[f"{path}.weight"]
    assert rel_err(after - before, 0.5 * 0.5 * up @ down[:, :, 0, 0]) < TOL


def test_parse_key_spellings():
    assert parse_key("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight") \
        .module == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    ref = parse_key("text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight")
    assert (ref.target, ref.module, ref.part) == ("text_encoder", "text_model.encoder.layers.0.self_attn.k_proj",
                                                  "down")
    ref = parse_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha")
    assert (ref.target, ref.module, ref.part, ref.kohya) == ("text_encoder_2", "text_model_encoder_layers_0_mlp_fc1",
                                                             "alpha", True)
    assert parse_key("unet.conv_in.weight") is None


def test_bad_files_name_the_key_and_change_nothing(pipelines, tmp_path):
    sd15, sdxl = pipelines["sd15"], pipelines["sdxl"]
    unet, encoders = _ours(sd15, "sd15")
    before = export_state(unet)
    good = write_tiny_lora(tmp_path / "good.safetensors", sd15, style="peft")
    xl = write_tiny_lora(tmp_path / "xl.safetensors", sdxl, style="kohya")
    with pytest.raises(UserError, match=r"xl\.safetensors: (key 'lora_unet_[\w.]+' matches no layer of the unet|LoRA "
                                        r"lora_unet_\w+\.lora_down\.weight has down .* but its layer takes)"):
        fuse_loras(unet, encoders, [(good, 1.0), (xl, 1.0)])
    after = export_state(unet)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the good file was not half-applied

    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = np.ones((2, 32), np.float32), np.ones((32, 2), np.float32)
    cases = [
        ({f"unet.{path}.lora_A.weight": a}, "has no up weight"),
        ({f"unet.{path}.lora_A.weight": a, f"unet.{path}.lora_B.weight": b,
          f"unet.{path}.lora_magnitude_vector": b[:, 0]}, "DoRA weights, which are not supported"),
        ({"lora_unet_conv_in.hada_w1_a": a}, "LoHa"),
        ({f"unet.{path}.weight": a}, "not a LoRA weight of a known format"),
        ({f"unet.{path}.lora_A.weight": np.ones((2, 48), np.float32), f"unet.{path}.lora_B.weight": b},
         r"has down \(2, 48\) and up \(32, 2\) but its layer takes 32 -> 32 channels"),
        ({"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": a}, "no text_encoder_2 was given"),
    ]
    for state, message in cases:
        with pytest.raises(UserError, match=message):
            fuse_loras(unet, encoders, [(state, 1.0)])


def test_ambiguous_kohya_name_is_refused():
    class Holder(nnx.Module):
        def __init__(self, **children):
            for k, v in children.items():
                setattr(self, k, v)

    rngs = nnx.Rngs(0)
    model = Holder(a_b=Holder(c=Linear(2, 2, rngs=rngs)), a=Holder(b_c=Linear(2, 2, rngs=rngs)))
    index = module_index(model, "text_encoder")
    assert index.kohya["a_b_c"] is None
    state = {"lora_te_a_b_c.lora_down.weight": np.ones((1, 2), np.float32),
             "lora_te_a_b_c.lora_up.weight": np.ones((2, 1), np.float32)}
    with pytest.raises(UserError, match="names more than one text_encoder layer"):
        read_lora(state, {"text_encoder": model})


def test_text_encoder_keys_with_and_without_the_text_model_prefix(pipelines):
    """transformers 4 wrote `text_encoder.text_model.encoder...`; transformers 5 saves a bare CLIPTextModel."""
    encoder = load_text_encoder(pipelines["sd15"] / "text_encoder")
    a, b = np.ones((2, 64), np.float32), np.ones((32, 2), np.float32)
    for name in ("text_encoder.text_model.encoder.layers.1.mlp.fc2", "text_encoder.encoder.layers.1.mlp.fc2",
                 "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        kohya = name.startswith("lora_")
        state = {f"{name}.lora_down.weight" if kohya else f"{name}.lora_A.weight": a,
                 f"{name}.lora_up.weight" if kohya else f"{name}.lora_B.weight": b}
        (layer,) = read_lora(state, {"text_encoder": encoder})
        assert (layer.target, layer.path) == ("text_encoder", "text_model.encoder.layers.1.mlp.fc2")
