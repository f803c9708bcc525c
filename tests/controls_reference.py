"""The image-prompt controls written a second time, from their definitions (ComfyUI_IPAdapter_plus' behaviour as
the project's reference notes describe it) and independently of the package: the attention-block numbering, the
weight-type tables, the embeds scaling of one attention, the negative-noise types and the tiled layout. Tests
compare the package with these."""

from __future__ import annotations

import math

import numpy as np

# Block t of each attention, in the reference's own words (SD1.5: 16 blocks, SDXL: 11).
BLOCKS = {
    "sd15": {**{f"down_blocks.{b}.attentions.{a}": 2 * b + a for b in range(3) for a in range(2)},
             "mid_block.attentions.0": 6,
             **{f"up_blocks.{b}.attentions.{a}": 7 + 3 * (b - 1) + a for b in (1, 2, 3) for a in range(3)}},
    "sdxl": {**{f"down_blocks.{b}.attentions.{a}": 2 * (b - 1) + a for b in (1, 2) for a in range(2)},
             "mid_block.attentions.0": 4,
             **{f"up_blocks.{b}.attentions.{a}": 5 + 3 * b + a for b in (0, 1) for a in range(3)}},
}
COUNT = {"sd15": 16, "sdxl": 11}
INPUT = {"sd15": range(0, 6), "sdxl": range(0, 4)}
MIDDLE = {"sd15": (6,), "sdxl": (4,)}
OUTPUT = {"sd15": range(7, 16), "sdxl": range(5, 11)}
SD15_STYLE = (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)


def block_of(path: str, base: str) -> int:
    """t of an `attn2` path (`...attentions.<j>.transformer_blocks.<k>.attn2`)."""
    return BLOCKS[base][path.split(".transformer_blocks.")[0]]


def reference_weights(kind: str, base: str, w: float, wc: float | None = None) -> tuple[dict[int, float], set[int]]:
    """({t: weight}, blocks whose branches a precise type swaps), from the reference tables. `wc`: our
    composition_weight (default w); for "composition precise" the reference's weight is wc and its
    composition_boost is w (the composition blocks take wc, the others derive from w, as in the other types)."""
    n = COUNT[base]
    wc = w if wc is None else wc
    ts = range(n)
    if kind == "linear":
        return dict.fromkeys(ts, w), set()
    if kind == "ease in":
        return {t: w * (0.05 + 0.95 * (1 - t / n)) for t in ts}, set()
    if kind == "ease out":
        return {t: w * (0.05 + 0.95 * (t / n)) for t in ts}, set()
    if kind == "ease in-out":
        return {t: w * (0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2))) for t in ts}, set()
    if kind == "reverse in-out":
        return {t: w * (0.05 + 0.95 * (abs(t - n / 2) / (n / 2))) for t in ts}, set()
    weak = {"weak input": [*INPUT[base]], "weak middle": [*MIDDLE[base]], "weak output": [*OUTPUT[base]],
            "strong middle": [*INPUT[base], *OUTPUT[base]]}
    if kind in weak:
        return {t: 0.2 * w if t in weak[kind] else w for t in ts}, set()
    if base == "sdxl":
        table = {
            "style transfer": {6: w},
            "composition": {3: w},
            "strong style transfer": {t: w for t in ts if t != 3},
            "style and composition": {3: wc, 6: w},
            "strong style and composition": {t: wc if t == 3 else w for t in ts},
            "style transfer precise": {3: wc, 6: w},
            "composition precise": {t: {3: wc, 6: w}.get(t, 0.1 * w) for t in ts},
        }[kind]
        swap = {"style transfer precise": {3}, "composition precise": set(ts) - {3}}.get(kind, set())
        return table, swap
    style = dict.fromkeys(SD15_STYLE, w)
    table = {
        "style transfer": style,
        "composition": {4: 0.25 * w, 5: w},
        "strong style transfer": {t: w for t in ts if t not in (4, 5)},
        "style and composition": {**style, 4: 0.25 * wc, 5: wc},
        "strong style and composition": {t: wc if t in (4, 5) else w for t in ts},
        "style transfer precise": {**style, 4: 0.25 * wc, 5: wc},
        "composition precise": {**style, 4: 0.25 * wc, 5: wc, 6: 0.1 * w, 7: 0.1 * w, 8: 0.1 * w},
    }[kind]
    swap = {"style transfer precise": {4, 5}, "composition precise": set(ts) - {4, 5}}.get(kind, set())
    return table, swap


def image_attention(torch, q, k, v, w: float, mode: str):
    """One image branch (q: (H, L, D); k, v: (H, S, D) = heads of K' and V') by the embeds-scaling definitions;
    C is K''s width (heads * head dim)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    c = k.shape[0] * k.shape[-1]
    if mode == "v":
        return w * sdpa(q, k, v)
    if mode == "kv":
        return sdpa(q, w * k, w * v)
    penalized = w * c / 1280
    if mode == "kv-penalty":
        return sdpa(q, penalized * k, penalized * v)
    mu = v.mean(dim=1, keepdim=True)
    return sdpa(q, penalized * k, (v - mu) + penalized * mu)


# ---- negative noise, with torch ops on the same draws --------------------------------------------------------

def torch_noise(torch, kind: str, image: np.ndarray, s: float, draws: dict) -> np.ndarray:
    img = torch.from_numpy(np.asarray(image, np.float32))
    t = {k: torch.from_numpy(v) for k, v in draws.items()}
    if kind == "fade":
        out = (1 - s) * img + s * t["u"]
    elif kind == "dissolve":
        m = (t["u"] < s).float()
        out = img * (1 - m) + t["u2"] * m
    elif kind == "gaussian":
        out = img + s * t["n"]
    else:
        warped = torch_elastic(torch, img, t["dx"], t["dy"], 75.0, 3.5 * (1 - s))
        flipped = torch.flip(warped, dims=(0, 1))
        g = 0.75 * s * t["n"]
        out = flipped * (1 - g) + g
    return out.clamp(0, 1).numpy()


def torch_elastic(torch, img_HWC, dx, dy, alpha: float, sigma: float):
    """torchvision's ElasticTransform written with torch ops: the fields blurred (reflect padding), scaled by
    alpha / size into grid units, added to the identity grid, and sampled with grid_sample (zeros outside)."""
    f = torch.nn.functional
    h, w = dx.shape
    if sigma > 0:
        size = int(8 * sigma + 1)
        size += 1 - size % 2
        x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = (kernel / kernel.sum()).float()

        def blur(field):
            padded = f.pad(field[None, None], (size // 2,) * 4, mode="reflect")
            out = f.conv2d(padded, kernel.view(1, 1, size, 1))
            return f.conv2d(out, kernel.view(1, 1, 1, size))[0, 0]

        dx, dy = blur(dx), blur(dy)
    gx = -1 + (2 * torch.arange(w, dtype=torch.float32) + 1) / w
    gy = -1 + (2 * torch.arange(h, dtype=torch.float32) + 1) / h
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)
    grid = grid + torch.stack([dx * alpha / w, dy * alpha / h], dim=-1)
    out = f.grid_sample(img_HWC.permute(2, 0, 1)[None], grid[None], mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out[0].permute(1, 2, 0)


# ---- tiles -----------------------------------------------------------------------------------------------------

def reference_tiles(width: int, height: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(resized (W, H), tile corners (left, top)) of the tiled layout, from the definition."""
    ratio = width / height
    if 0.75 <= ratio <= 1.33:
        return (512, 512), [(0, 0), (256, 0), (0, 256), (256, 256)]
    short, long = min(width, height), max(width, height)
    long = min(round(long * 256 / short), 4 * 256)
    n = math.ceil(long / 256)
    overlap = (n * 256 - long) / (n - 1)
    starts = [round(i * (256 - overlap)) for i in range(n)]
    if width > height:
        return (long, 256), [(s, 0) for s in starts]
    return (256, long), [(0, s) for s in starts]
