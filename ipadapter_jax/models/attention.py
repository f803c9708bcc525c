"""Scaled dot-product attention with selectable implementations, and the UNet `Attention` module whose
cross-attention carries the decoupled IP-Adapter branch (`to_k_ip`/`to_v_ip`, one pair per adapter)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.attention_policy import AttentionPolicy, Implementation, as_policy
from ipadapter_jax.models.ip_conditioning import IPConditioning, downsample_mask
from ipadapter_jax.models.layers import IPAdapterParam, Linear

__all__ = ["Attention", "AttentionPolicy", "Implementation", "attention"]
_CHUNK = 1024  # query rows per block in the chunked path


def _plain(q_BLHD, k_BSHD, v_BSHD):
    scale = jnp.asarray(q_BLHD.shape[-1] ** -0.5, q_BLHD.dtype)
    logits = jnp.einsum("blhd,bshd->bhls", q_BLHD * scale, k_BSHD, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSHD.dtype)
    return jnp.einsum("bhls,bshd->blhd", probs, v_BSHD, preferred_element_type=jnp.float32).astype(q_BLHD.dtype)


def _blocks_forward(q_NCQD, k_NSD, v_NSD):
    """Per head N and query block C: exact softmax attention and its log-sum-exp (for the backward pass)."""

    def one_head(args):
        q_CQD, k_SD, v_SD = args

        def one_block(q_QD):
            s = jnp.dot(q_QD, k_SD.T, preferred_element_type=jnp.float32)
            m = s.max(axis=-1, keepdims=True)
            p = jnp.exp(s - m)
            total = p.sum(axis=-1, keepdims=True)
            o = jnp.dot(p.astype(v_SD.dtype), v_SD, preferred_element_type=jnp.float32) / total
            return o.astype(q_QD.dtype), (m + jnp.log(total))[..., 0]

        return jax.lax.map(one_block, q_CQD)

    return jax.lax.map(one_head, (q_NCQD, k_NSD, v_NSD))


@jax.custom_vjp
def _blockwise(q_NCQD, k_NSD, v_NSD):
    return _blocks_forward(q_NCQD, k_NSD, v_NSD)[0]


def _blockwise_fwd(q_NCQD, k_NSD, v_NSD):
    out, lse = _blocks_forward(q_NCQD, k_NSD, v_NSD)
    return out, (q_NCQD, k_NSD, v_NSD, out, lse)


def _blockwise_bwd(residuals, d_out):
    """Flash-attention style: recompute each block's probabilities from the saved log-sum-exp instead of
    keeping the (L, S) matrices, accumulating dK and dV over query blocks.

    dK and dV accumulate transposed, as (D, S): XLA:CPU runs `p^T @ dO` (contracting the long rows of p) 2.5x
    slower than `dO^T @ p`, which writes the same numbers in the other orientation; one small transpose at the
    end replaces two large ones per block (the backward of a 4096-token layer: 1.0 s -> 0.6 s on 2 cores).
    """
    q, k, v, out, lse = residuals

    def one_head(args):
        q_CQD, k_SD, v_SD, o_CQD, lse_CQ, do_CQD = args
        f32 = jnp.float32

        def one_block(carry, xs):
            dk_DS, dv_DS = carry
            q_QD, o_QD, lse_Q, do_QD = xs
            s = jnp.dot(q_QD, k_SD.T, preferred_element_type=f32)
            p = jnp.exp(s - lse_Q[:, None])
            dv_DS = dv_DS + jnp.dot(do_QD.astype(f32).T, p)
            dp = jnp.dot(do_QD, v_SD.T, preferred_element_type=f32)
            delta = jnp.sum(do_QD.astype(f32) * o_QD.astype(f32), axis=-1, keepdims=True)
            ds = p * (dp - delta)
            dk_DS = dk_DS + jnp.dot(q_QD.astype(f32).T, ds)
            return (dk_DS, dv_DS), jnp.dot(ds, k_SD.astype(f32)).astype(q_QD.dtype)

        zeros = jnp.zeros(k_SD.shape[::-1], f32)
        (dk_DS, dv_DS), dq = jax.lax.scan(one_block, (zeros, zeros), (q_CQD, o_CQD, lse_CQ, do_CQD))
        return dq, dk_DS.T.astype(k_SD.dtype), dv_DS.T.astype(v_SD.dtype)

    return jax.lax.map(one_head, (q, k, v, out, lse, d_out))


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _chunked(q_BLHD, k_BSHD, v_BSHD):
    """Long self-attention for XLA:CPU: one (batch, head) and 1024 query rows at a time, exact softmax.

    XLA:CPU fuses the full QK^T -> softmax -> PV chain badly at 4096 tokens; small per-block matmuls with an
    explicit max subtraction run several times faster and never materialise the whole score tensor, and the
    custom backward recomputes the blocks rather than storing them (training memory stays flat).
    """
    b, l, h, d = q_BLHD.shape
    chunk = _CHUNK if l % _CHUNK == 0 else l
    scale = jnp.asarray(d**-0.5, q_BLHD.dtype)
    q = jnp.transpose(q_BLHD * scale, (0, 2, 1, 3)).reshape(b * h, l // chunk, chunk, d)
    k = jnp.transpose(k_BSHD, (0, 2, 1, 3)).reshape(b * h, -1, d)
    v = jnp.transpose(v_BSHD, (0, 2, 1, 3)).reshape(b * h, -1, d)
    out = _blockwise(q, k, v)
    return jnp.transpose(out.reshape(b, h, l, d), (0, 2, 1, 3))


def attention(q_BLHD, k_BSHD, v_BSHD, implementation: Implementation | AttentionPolicy = "auto"):
    """softmax(q k^T / sqrt(d)) v over heads; every implementation gives the same numbers to rounding.

    `implementation`: a name, or the `AttentionPolicy` of a model built for a target platform, which picks one
    from the shapes and dtype (`models/attention_policy.py`); "auto" without a platform is the XLA path."""
    policy = as_policy(implementation)
    implementation = policy.choose(q_BLHD.shape, k_BSHD.shape, q_BLHD.dtype)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q_BLHD, k_BSHD, v_BSHD, implementation="cudnn")
    if implementation == "chunked":
        with jax.named_scope("cpu_chunked_attention"):  # named in the HLO: tests check where it is used
            return _chunked(q_BLHD, k_BSHD, v_BSHD)
    if implementation == "pallas":
        from ipadapter_jax.models.pallas_attention import sharded_flash_attention

        out = sharded_flash_attention(q_BLHD, k_BSHD, v_BSHD, lanes=policy.lanes, store_probs=policy.store_probs,
                                      tokens=policy.tokens)
        return _plain(q_BLHD, k_BSHD, v_BSHD) if out is None else out
    return _plain(q_BLHD, k_BSHD, v_BSHD)


class Attention(nnx.Module):
    """diffusers' `Attention` as used in the UNet: `to_q`, `to_k`, `to_v`, `to_out.0`; in cross-attention also
    one `to_k_ip.i`/`to_v_ip.i` pair per IP-Adapter, whose outputs are added with a per-call scale."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, *, cross_attention_dim: int | None = None,
                 bias: bool = False, out_bias: bool = True, num_ip_adapters: int = 0, ip_layer: int = -1,
                 attention_impl: Implementation = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_k = Linear(context_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_v = Linear(context_dim, inner, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([Linear(inner, query_dim, use_bias=out_bias, dtype=dtype, rngs=rngs)])
        ip = dict(use_bias=False, dtype=dtype, rngs=rngs, param_type=IPAdapterParam)
        self.to_k_ip = nnx.List([Linear(context_dim, inner, **ip) for _ in range(num_ip_adapters)])
        self.to_v_ip = nnx.List([Linear(context_dim, inner, **ip) for _ in range(num_ip_adapters)])
        self.ip_layer = ip_layer  # this layer's index in the official `ip_adapter.<2i+1>` numbering order
        self.attention_impl = as_policy(attention_impl)  # made concrete by models/target.set_target

    def _heads(self, x_BLC):
        return x_BLC.reshape(*x_BLC.shape[:2], self.heads, -1)

    def __call__(self, x_BLC, context_BSC=None, *, ip: IPConditioning | None = None):
        context = x_BLC if context_BSC is None else context_BSC
        q = self._heads(self.to_q(x_BLC))
        k, v = self._heads(self.to_k(context)), self._heads(self.to_v(context))
        if ip is not None and len(self.to_k_ip):
            if len(ip.tokens) != len(self.to_k_ip):
                raise ValueError(f"the UNet holds {len(self.to_k_ip)} IP-Adapters but {len(ip.tokens)} were given")
            joined = self._joined_key_sets(q, k, v, ip)
            out = joined if joined is not None else (attention(q, k, v, self.attention_impl)
                                                     + self._image_branch(q, ip))
        else:
            out = attention(q, k, v, self.attention_impl)
        return self.to_out[0](out.reshape(*x_BLC.shape[:2], -1))

    def _joined_key_sets(self, q_BLHD, k_BSHD, v_BSHD, ip: IPConditioning):
        """The plain decoupled cross-attention as one kernel call where the policy joins key sets (TPU, tokens
        layout): keys [text, image tokens of each adapter], values [text, scale * image values], a softmax per
        set, so the outputs add up as in `_image_branch`. None where it does not apply (masks, controls, other
        targets, too many keys, a mesh the batch does not divide over)."""
        if any(m is not None for m in ip.masks) or any(c is not None for c in ip.controls or ()):
            return None
        tokens = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in ip.tokens]
        if not self.attention_impl.joins_key_sets(q_BLHD.shape, k_BSHD.shape[1] + sum(t.shape[1] for t in tokens)):
            return None
        from ipadapter_jax.models.pallas_attention import sharded_flash_attention

        keys, values, starts = [k_BSHD], [v_BSHD], []
        for a, (t, scale) in enumerate(zip(tokens, ip.scales, strict=True)):
            starts.append(sum(x.shape[1] for x in keys))
            layer_scale = scale[..., self.ip_layer].astype(q_BLHD.dtype).reshape(-1, 1, 1, 1)
            keys.append(self._heads(self.to_k_ip[a](t)))
            values.append(self._heads(self.to_v_ip[a](t)) * layer_scale)
        policy = self.attention_impl
        return sharded_flash_attention(q_BLHD, jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1),
                                       lanes=policy.lanes, store_probs=policy.store_probs, tokens=True,
                                       segments=tuple(starts))

    def _image_branch(self, q_BLHD, ip: IPConditioning):
        """Sum over adapters of scale * attention(q, image tokens); masked images attend one at a time. An adapter
        with `LayerControls` may read other tokens on this layer, scale its keys and shift by the values' mean."""
        controls = ip.controls if ip.controls is not None else (None,) * len(ip.tokens)
        dtype = q_BLHD.dtype
        total = jnp.zeros_like(q_BLHD)
        for a, (tokens_BNTC, scale, mask, ctrl) in enumerate(zip(ip.tokens, ip.scales, ip.masks, controls,
                                                                 strict=True)):
            to_k, to_v = self.to_k_ip[a], self.to_v_ip[a]
            if mask is None:
                # scale: (n_layers,) for the whole batch, or (B, n_layers) per batch row
                def at_layer(x):
                    return x[..., self.ip_layer].astype(dtype).reshape(-1, 1, 1, 1)

                layer_scale = at_layer(scale)
                if ctrl is not None:
                    tokens_BNTC = jnp.where(at_layer(ctrl.use_alt) > 0, ctrl.alt_tokens, tokens_BNTC)
                tokens = tokens_BNTC.reshape(tokens_BNTC.shape[0], -1, tokens_BNTC.shape[-1])
                if ctrl is None:
                    o = attention(q_BLHD, self._heads(to_k(tokens)), self._heads(to_v(tokens)), self.attention_impl)
                    total = total + layer_scale * o
                else:
                    o = self._controlled(q_BLHD, tokens, to_k, to_v, at_layer(ctrl.key_scale),
                                         at_layer(ctrl.mean_shift))
                    total = total + layer_scale * o
                continue
            layer_scale = scale[self.ip_layer].astype(dtype)
            mask_BNL = downsample_mask(mask, q_BLHD.shape[1]).astype(dtype)
            for j in range(tokens_BNTC.shape[1]):
                tokens = tokens_BNTC[:, j]
                if ctrl is None:
                    o = attention(q_BLHD, self._heads(to_k(tokens)), self._heads(to_v(tokens)), self.attention_impl)
                    total = total + layer_scale[j] * o * mask_BNL[:, j, :, None, None]
                    continue
                tokens = jnp.where(ctrl.use_alt[self.ip_layer, j] > 0, ctrl.alt_tokens[:, j], tokens)
                o = self._controlled(q_BLHD, tokens, to_k, to_v, ctrl.key_scale[self.ip_layer, j].astype(dtype),
                                     ctrl.mean_shift[self.ip_layer, j].astype(dtype))
                total = total + layer_scale[j] * o * mask_BNL[:, j, :, None, None]
        return total

    def _controlled(self, q_BLHD, tokens_BSC, to_k, to_v, key_scale, mean_shift):
        """attention(q, key_scale * K', V' + mean_shift * mu), mu = V' averaged over the tokens."""
        k_BSHD, v_BSHD = self._heads(to_k(tokens_BSC)), self._heads(to_v(tokens_BSC))
        v_BSHD = v_BSHD + mean_shift * jnp.mean(v_BSHD, axis=1, keepdims=True)
        return attention(q_BLHD, k_BSHD * key_scale, v_BSHD, self.attention_impl)
