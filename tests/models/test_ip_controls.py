"""Image-prompt controls at UNet level, float32: weight types, precise swaps, embeds scaling, composition tokens and
masks against diffusers' UNet with a hand-written attention processor that computes the definitions
(tests/controls_reference.py), on SD1.5- and SDXL-shaped tiny UNets, two items with their own settings under
classifier-free guidance; and neutral controls leave the plain image branch bit for bit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from controls_reference import block_of, image_attention, reference_weights
from diffusers.image_processor import IPAdapterMaskProcessor
from flax import nnx
from reference_models import SDXL_UNET, rel_err, save_unet

from ipadapter_jax.generation.conditioning import Conditioning, guided
from ipadapter_jax.models.ip_conditioning import IPConditioning, LayerControls
from ipadapter_jax.models.unet import cross_attentions
from ipadapter_jax.pipelines.image_prompt import ImagePrompt
from ipadapter_jax.pipelines.layer_controls import adapter_controls
from ipadapter_jax.tiny_models import TINY_UNET_FULL_LAYOUT
from ipadapter_jax.weights.diffusers_models import load_unet

SD15_UNET = {k: v for k, v in TINY_UNET_FULL_LAYOUT.items() if not k.startswith("_")}
UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
TOKENS = 4
ACTS = 1e-5  # "the control changes the output": 100x what float32 rounding explains
SEPARATE = ("style and composition", "strong style and composition", "style transfer precise", "composition precise")


@dataclasses.dataclass
class Item:
    kind: str = "linear"
    w: float = 1.0
    mode: str = "v"
    composition: bool = False

    @property
    def wc(self):
        return 0.4 * self.w if self.kind in SEPARATE else None

    def prompt(self) -> ImagePrompt:
        return ImagePrompt(weight_type=self.kind, scale=self.w, embeds_scaling=self.mode,
                           composition_weight=self.wc, composition_images=["c.png"] if self.composition else None)


class ReferenceProcessor:
    """attn2 with one IP-Adapter written from the definitions: rows interleaved [uncond_0, cond_0, ...]; per item
    its weight at this block, embeds scaling, precise swap (uncond takes the cond tokens, cond zero tokens) and
    composition tokens (replacing the cond ones on the composition block)."""

    def __init__(self, torch, path: str, base: str, hidden: int, cross: int, seed: int, state: dict):
        gen = torch.Generator().manual_seed(seed)
        self.torch, self.t, self.base, self.state = torch, block_of(path, base), base, state
        self.to_k_ip = torch.nn.Linear(cross, hidden, bias=False)
        self.to_v_ip = torch.nn.Linear(cross, hidden, bias=False)
        with torch.no_grad():
            for lin in (self.to_k_ip, self.to_v_ip):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.3)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        torch = self.torch
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ctx, (tokens, comp, masks) = encoder_hidden_states
        rows, length, _ = hidden_states.shape

        def heads(x):  # (S, h * d) -> (h, S, d)
            return x.view(x.shape[0], attn.heads, -1).transpose(0, 1)

        q = attn.to_q(hidden_states)
        out = []
        for r in range(rows):
            qr = heads(q[r])
            o = sdpa(qr, heads(attn.to_k(ctx[r])), heads(attn.to_v(ctx[r])))
            item, cond = self.state["items"][r // 2], r % 2 == 1
            table, swap = reference_weights(item.kind, self.base, item.w, item.wc)
            w = table.get(self.t, 0.0)
            images = range(tokens.shape[1]) if masks is not None else [None]
            for j in images:
                pick = slice(None) if j is None else slice(j, j + 1)
                c = tokens[r, pick]
                if self.t in swap:
                    c = torch.zeros_like(c) if cond else tokens[r + 1, pick]
                elif item.composition and cond and self.base == "sdxl" and self.t == 3:
                    c = comp[r, pick]
                c = c.reshape(-1, c.shape[-1])
                image = image_attention(torch, qr, heads(self.to_k_ip(c)), heads(self.to_v_ip(c)), w, item.mode)
                if j is not None:
                    down = IPAdapterMaskProcessor.downsample(masks[j:j + 1], 1, length, 1)[0, :, 0]
                    image = image * down[None, :, None]
                o = o + image
            out.append(o.transpose(0, 1).reshape(length, -1))
        return attn.to_out[1](attn.to_out[0](torch.stack(out)))


@pytest.fixture(scope="module", params=sorted(UNETS))
def models(request, tmp_path_factory, torch):
    from diffusers.models.attention_processor import AttnProcessor2_0

    base = request.param
    cfg = UNETS[base]
    folder = tmp_path_factory.mktemp(f"controls-{base}")
    ref = save_unet(folder, cfg)
    unet = load_unet(folder, num_ip_adapters=1)
    paths = [layer.path for layer in unet.config.cross_attention_layers()]
    state: dict = {}
    processors = {}
    for name in ref.attn_processors:
        path = name.removesuffix(".processor")
        if not path.endswith("attn2"):
            processors[name] = AttnProcessor2_0()
            continue
        module = ref.get_submodule(path)
        proc = ReferenceProcessor(torch, path, base, module.to_q.out_features, cfg["cross_attention_dim"],
                                  paths.index(path), state)
        attn = cross_attentions(unet)[paths.index(path)]
        attn.to_k_ip[0].kernel.set_value(jnp.asarray(proc.to_k_ip.weight.detach().numpy().T))
        attn.to_v_ip[0].kernel.set_value(jnp.asarray(proc.to_v_ip.weight.detach().numpy().T))
        processors[name] = proc
    ref.set_attn_processor(processors)
    graphdef, params = nnx.split(unet)

    @jax.jit
    def forward(params, x, t, ctx, added, ip):
        return nnx.merge(graphdef, params)(x, t, ctx, ip=ip, **added)

    return base, cfg, ref, unet, params, forward, state


def _inputs(cfg, items: int = 4, images: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = 2 * items
    inputs = dict(x=rng.standard_normal((rows, 4, 16, 16)).astype(np.float32),
                  t=np.repeat(np.linspace(10, 700, items).astype(np.int64), 2),
                  ctx=rng.standard_normal((rows, 7, cfg["cross_attention_dim"])).astype(np.float32),
                  neg=rng.standard_normal((items, images, TOKENS, cfg["cross_attention_dim"])).astype(np.float32),
                  pos=rng.standard_normal((items, images, TOKENS, cfg["cross_attention_dim"])).astype(np.float32),
                  comp=rng.standard_normal((items, images, TOKENS, cfg["cross_attention_dim"])).astype(np.float32),
                  added={})
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        inputs["added"] = {"text_embeds": rng.standard_normal((rows, pooled)).astype(np.float32),
                           "time_ids": np.tile(np.array([[64, 48, 0, 8, 64, 64]], np.float32), (rows, 1))}
    return inputs


def _ours(models, inputs, items: list[Item], masks=None):
    _, _, _, unet, params, forward, _ = models
    n_masked = None if masks is None else inputs["pos"].shape[1]
    pairs = [(jnp.asarray(inputs["neg"][i:i + 1]), jnp.asarray(inputs["pos"][i:i + 1])) for i in range(len(items))]
    comps = [jnp.asarray(inputs["comp"][i:i + 1]) if it.composition else None for i, it in enumerate(items)]
    scale, neg_ctrl, pos_ctrl = adapter_controls([it.prompt() for it in items], pairs, comps, unet.config, n_masked)
    mask = None if masks is None else jnp.asarray(masks)
    ctx = jnp.asarray(inputs["ctx"])

    def branch(tokens, controls, rows):
        return Conditioning(ctx[rows], ip=IPConditioning((jnp.asarray(tokens),), (scale,), (mask,), (controls,)))

    ip = guided(branch(inputs["neg"], neg_ctrl, slice(0, None, 2)),
                branch(inputs["pos"], pos_ctrl, slice(1, None, 2))).ip
    out = forward(params, jnp.asarray(inputs["x"].transpose(0, 2, 3, 1)), jnp.asarray(inputs["t"]), ctx,
                  {k: jnp.asarray(v) for k, v in inputs["added"].items()}, ip)
    return np.asarray(out).transpose(0, 3, 1, 2)


def _reference(torch, models, inputs, items: list[Item], masks=None):
    _, _, ref, _, _, _, state = models
    state["items"] = items

    def rows(a):  # (items, N, T, C) per branch -> (2 * items, N, T, C) as [neg_0, pos_0, ...]
        return torch.from_numpy(np.stack([a[0], a[1]], axis=1).reshape(-1, *a[0].shape[1:]))

    tokens = rows((inputs["neg"], inputs["pos"]))
    comp = rows((inputs["neg"], inputs["comp"]))
    mask = None if masks is None else torch.from_numpy(np.asarray(masks, np.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the per-row loop is many tiny ops: no OpenMP spin-waits on a busy CPU
    try:
        with torch.no_grad():
            added = {k: torch.tensor(v) for k, v in inputs["added"].items()} or None
            return ref(torch.tensor(inputs["x"]), torch.tensor(inputs["t"]),
                       (torch.tensor(inputs["ctx"]), (tokens, comp, mask)), added_cond_kwargs=added).sample.numpy()
    finally:
        torch.set_num_threads(threads)


# four items per call (eight rows under guidance), each with its own weight type
WEIGHT_GROUPS = [("linear", "ease in", "ease out", "ease in-out"),
                 ("reverse in-out", "weak input", "weak middle", "weak output"),
                 ("strong middle", "style transfer", "composition", "strong style transfer"),
                 ("style and composition", "strong style and composition", "style transfer precise",
                  "composition precise")]
WEIGHTS = (0.8, 1.3, 0.6, 1.1)


def test_weight_types_match_the_definitions(torch, models):
    inputs = _inputs(models[1])
    plain = _ours(models, inputs, [Item(w=w) for w in WEIGHTS])
    for kinds in WEIGHT_GROUPS:
        items = [Item(kind, w) for kind, w in zip(kinds, WEIGHTS, strict=True)]
        ours, expected = _ours(models, inputs, items), _reference(torch, models, inputs, items)
        assert rel_err(ours, expected) < 1e-5, (kinds, rel_err(ours, expected))
        for row, kind in enumerate(kinds):  # each type really acts on its own rows
            if kind != "linear":
                assert rel_err(ours[2 * row:2 * row + 2], plain[2 * row:2 * row + 2]) > ACTS, kind


def test_embeds_scaling_and_precise_swaps_match_the_definitions(torch, models):
    inputs = _inputs(models[1], seed=1)
    modes = ("v", "kv", "kv-penalty", "kv-mean-penalty")
    items = [Item(kind, w, mode) for kind, w, mode in
             zip(("style transfer precise", "composition precise") * 2, (1.4, 0.9, 1.2, 0.7), modes, strict=True)]
    ours, expected = _ours(models, inputs, items), _reference(torch, models, inputs, items)
    assert rel_err(ours, expected) < 1e-5
    unswapped = _ours(models, inputs, [dataclasses.replace(it, kind="style and composition") for it in items])
    v_only = _ours(models, inputs, [dataclasses.replace(it, mode="v") for it in items])
    for row in range(4):
        rows = slice(2 * row, 2 * row + 2)
        assert rel_err(ours[rows], unswapped[rows]) > ACTS
        if row:
            assert rel_err(ours[rows], v_only[rows]) > ACTS, modes[row]


def test_composition_tokens_and_masked_images_match_the_definitions(torch, models):
    base = models[0]
    inputs = _inputs(models[1], seed=2)
    xl = base == "sdxl"
    items = [Item("style and composition", 1.2, "kv-mean-penalty", composition=xl),
             Item("strong style and composition", 0.7, "v", composition=xl),
             Item("style and composition", 0.9, "kv"), Item("linear", 1.0, "kv-penalty")]
    ours, expected = _ours(models, inputs, items), _reference(torch, models, inputs, items)
    assert rel_err(ours, expected) < 1e-5
    if xl:
        without = _ours(models, inputs, [dataclasses.replace(it, composition=False) for it in items])
        assert rel_err(ours[:4], without[:4]) > ACTS and np.array_equal(ours[4:], without[4:])
    masked_inputs = _inputs(models[1], items=2, images=2, seed=3)
    masks = np.zeros((2, 32, 32), np.float32)
    masks[0, :, :16], masks[1, :, 16:] = 1.0, 1.0
    items = [Item("style transfer precise", 1.1, "kv-mean-penalty"), Item("style transfer precise", 1.1, "kv")]
    with pytest.raises(Exception, match="must share their IP-Adapter scales and weight types"):
        _ours(models, masked_inputs, items, masks)
    items = [Item("composition precise", 1.1, "kv-mean-penalty")] * 2
    ours, expected = _ours(models, masked_inputs, items, masks), _reference(torch, models, masked_inputs, items, masks)
    assert rel_err(ours, expected) < 1e-5


def test_neutral_controls_leave_the_plain_branch_bit_for_bit(models):
    base, cfg, _, unet, params, forward, _ = models
    if base != "sdxl":
        pytest.skip("one layout suffices (two more compilations); the pipelines check it end to end")
    inputs = _inputs(cfg, seed=4)
    n = unet.num_ip_layers
    tokens = jnp.asarray(np.concatenate([inputs["neg"], inputs["pos"]]))
    scales = jnp.asarray(np.random.default_rng(5).uniform(0.2, 1.5, n).astype(np.float32))
    plain = IPConditioning((tokens,), (scales,), (None,))
    neutral = LayerControls(jnp.ones(n), jnp.zeros(n), jnp.zeros(n), jnp.zeros_like(tokens))
    args = (params, jnp.asarray(inputs["x"].transpose(0, 2, 3, 1)), jnp.asarray(inputs["t"]),
            jnp.asarray(inputs["ctx"]), {k: jnp.asarray(v) for k, v in inputs["added"].items()})
    np.testing.assert_array_equal(forward(*args, dataclasses.replace(plain, controls=(neutral,))),
                                  forward(*args, plain))
