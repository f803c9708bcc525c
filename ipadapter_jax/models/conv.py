"""2-D convolution (NHWC activations, HWIO kernels) with CPU-friendly paths: a GEMM input gradient and bfloat16
tap products.

XLA computes a convolution's input gradient as a second convolution whose kernel is the forward kernel
flipped in space with its channel axes swapped. On XLA:CPU that flip-and-transpose is a separate copy of the
whole kernel, done on every backward pass: about 50 ms for one 3x3x1280x1280 kernel on 2 cores, more than the
convolution itself at the 16x16 and 8x8 resolutions of an SD UNet, where kernels are large and activations
small. Adapter training backpropagates through every frozen UNet convolution, so it pays this dozens of times
per step.

`conv2d` avoids the copy there: the input gradient is one matrix product of the output gradient with the
kernel read in its stored layout (`dY @ W^T`, giving every tap's contribution at once), then a sum of
`k * k` shifted slices (col2im). Same numbers to rounding; used only on CPU, for stride-1 "same" convolutions
whose kernel holds several times more values than the output gradient (elsewhere XLA's own gradient is
faster). The kernel's gradient, needed only when a kernel trains, is XLA's.

In bfloat16, XLA:CPU sends convolutions to Eigen, which is slower than its float32 (94 against 87 ms for a 3x3
1280->1280 convolution over 2 x 16 x 16 on a 2-core AMD EPYC), while matrix products go to YNNPACK, twice as fast
in bfloat16 as in float32. So a bfloat16 "same" 3x3 convolution with at least `_TAP_DOTS_MIN_CHANNELS` input
channels is computed as `k * k` matrix products, one per tap over the shifted input, accumulated in float32:
56 ms for the convolution above, 217 against 313 ms for 960->320 at 2 x 64 x 64 (Eigen wins below 640 input
channels: 86 against 78 ms for 320->320 at 64 x 64). Its input gradient is the GEMM one above.

A nearest-neighbour 2x upsample followed by a 3x3 "same" convolution (every Upsample2D of the UNet and the VAE
decoder) is, for each of the four output parities, a 2x2 convolution of the low-resolution input with summed
kernel taps (sub-pixel form): 16 taps over H x W instead of 9 over 2H x 2W, 2.25x fewer FLOPs, and no upsampled
copy. `upsample2x_conv` computes it that way on CPU in float32 from 32 x 32 inputs on (2 x 32 x 32 x 640: 167
against 307 ms; the VAE decoder's 1 x 128 x 128 x 512: 711 against 1535 ms; at 16 x 16 x 1280 it is even, and
below that the small 2x2 convolutions lose); elsewhere it is the upsample, then the convolution.

Whether the program is compiled for CPU is the caller's static flag (`Conv2d.for_cpu`, set by
`models/target.set_target`), never the host's backend: a CPU host also compiles for TPUs.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
_KERNEL_TO_OUTPUT_RATIO = 4  # use the GEMM input gradient when the kernel is this many times the output
_TAP_DOTS_MIN_CHANNELS = 640  # bfloat16 tap products from this many input channels on
_SUBPIXEL_MIN_PIXELS = 32 * 32  # the sub-pixel upsample-convolution from this many input pixels on


def _conv(x_BHWC, kernel_HWIO, stride: int, padding: int, accumulate):
    return jax.lax.conv_general_dilated(x_BHWC, kernel_HWIO, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=_DIMENSIONS, preferred_element_type=accumulate)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _same_conv(x_BHWC, kernel_HWIO, padding: int, accumulate):
    return _conv(x_BHWC, kernel_HWIO, 1, padding, accumulate)


def _same_conv_fwd(x_BHWC, kernel_HWIO, padding, accumulate):
    return _conv(x_BHWC, kernel_HWIO, 1, padding, accumulate), (x_BHWC, kernel_HWIO)


def _same_conv_bwd(padding, accumulate, residuals, g_BHWO):
    x_BHWC, kernel_HWIO = residuals
    kh, kw, c_in, c_out = kernel_HWIO.shape
    b, h, w, _ = g_BHWO.shape
    # Every tap's contribution at every output position: (B*H*W, O) x (kh*kw*I, O)^T.
    taps = jax.lax.dot_general(g_BHWO.reshape(-1, c_out).astype(kernel_HWIO.dtype),
                               kernel_HWIO.reshape(kh * kw * c_in, c_out), (((1,), (1,)), ((), ())),
                               preferred_element_type=accumulate)
    taps = taps.reshape(b, h, w, kh, kw, c_in)
    # dx[a] = sum over taps k of taps[a + padding - k, k]: pad, then add k*k shifted windows.
    taps = jnp.pad(taps, ((0, 0), (kh - 1 - padding, padding), (kw - 1 - padding, padding),
                          (0, 0), (0, 0), (0, 0)))
    dx = sum(taps[:, kh - 1 - i:kh - 1 - i + h, kw - 1 - j:kw - 1 - j + w, i, j]
             for i in range(kh) for j in range(kw))
    _, kernel_vjp = jax.vjp(lambda k: _conv(x_BHWC, k, 1, padding, accumulate), kernel_HWIO)
    (d_kernel,) = kernel_vjp(g_BHWO)
    return dx.astype(x_BHWC.dtype), d_kernel.astype(kernel_HWIO.dtype)


_same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def _same_padding(kernel_HWIO, stride: int, padding: int) -> bool:
    kh, kw = kernel_HWIO.shape[:2]
    return stride == 1 and kh == kw and kh % 2 == 1 and padding == (kh - 1) // 2 and kh > 1


def _tap_dots_pay(x_BHWC, kernel_HWIO, stride: int, padding: int) -> bool:
    return (x_BHWC.dtype == jnp.bfloat16 and _same_padding(kernel_HWIO, stride, padding)
            and kernel_HWIO.shape[2] >= _TAP_DOTS_MIN_CHANNELS)


def _tap_dots(x_BHWC, kernel_HWIO, padding: int, accumulate):
    """A stride-1 "same" convolution as one matrix product per kernel tap, summed in float32."""
    kh, kw = kernel_HWIO.shape[:2]
    _, h, w, _ = x_BHWC.shape
    padded = jnp.pad(x_BHWC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    total = None
    for i in range(kh):
        for j in range(kw):
            y = jax.lax.dot_general(padded[:, i:i + h, j:j + w], kernel_HWIO[i, j], (((3,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
            total = y if total is None else total + y
    return total.astype(accumulate or x_BHWC.dtype)


# Autodiff of the tap products would add the k * k input-gradient pieces in bfloat16, rounding at every addition;
# the GEMM input gradient below sums them in float32 and rounds once, as XLA's convolution gradient does.
@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tap_conv(x_BHWC, kernel_HWIO, padding: int, accumulate):
    return _tap_dots(x_BHWC, kernel_HWIO, padding, accumulate)


def _tap_conv_fwd(x_BHWC, kernel_HWIO, padding, accumulate):
    return _tap_dots(x_BHWC, kernel_HWIO, padding, accumulate), (x_BHWC, kernel_HWIO)


_tap_conv.defvjp(_tap_conv_fwd, _same_conv_bwd)


def _gemm_gradient_pays(x_BHWC, kernel_HWIO, stride: int, padding: int) -> bool:
    out_elems = x_BHWC.shape[0] * x_BHWC.shape[1] * x_BHWC.shape[2] * kernel_HWIO.shape[3]
    return _same_padding(kernel_HWIO, stride, padding) and kernel_HWIO.size >= _KERNEL_TO_OUTPUT_RATIO * out_elems


def conv2d(x_BHWC, kernel_HWIO, *, stride: int = 1, padding: int = 0, accumulate=None,
           for_cpu: bool = False):
    """`lax.conv_general_dilated` over NHWC/HWIO with symmetric padding; `for_cpu` (programs compiled for CPU
    only) allows the bfloat16 tap products and the GEMM input gradient where they pay, see the module note."""
    if for_cpu and _tap_dots_pay(x_BHWC, kernel_HWIO, stride, padding):
        with jax.named_scope("cpu_tap_dots_conv"):  # named in the HLO: tests check where it is used
            return _tap_conv(x_BHWC, kernel_HWIO, padding, accumulate)
    if for_cpu and _gemm_gradient_pays(x_BHWC, kernel_HWIO, stride, padding):
        with jax.named_scope("cpu_gemm_conv"):  # named in the HLO: tests check where it is used
            return _same_conv(x_BHWC, kernel_HWIO, padding, accumulate)
    return _conv(x_BHWC, kernel_HWIO, stride, padding, accumulate)


# Which 3x3 kernel rows (columns) feed each low-resolution tap of an output parity: for even output rows the
# taps sit at input offsets (-1, 0) and gather kernel rows (0), (1, 2); for odd rows at (0, +1) from (0, 1), (2).
_PARITY_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def _subpixel_upsample_conv(x_BHWC, kernel_HWIO, accumulate):
    b, h, w, _ = x_BHWC.shape
    taps = jnp.asarray(_PARITY_TAPS, jnp.float32)  # (parity, tap, kernel row)
    kernels = jnp.einsum("ath,bsw,hwio->abtsio", taps, taps, kernel_HWIO.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST).astype(kernel_HWIO.dtype)
    padded = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = []
    for a in range(2):
        cols = [_conv(padded[:, a:a + h + 1, c:c + w + 1], kernels[a, c], 1, 0, accumulate) for c in range(2)]
        rows.append(jnp.stack(cols, axis=3))  # (B, H, W, 2, O): column parity
    out = jnp.stack(rows, axis=2)  # (B, H, 2, W, 2, O): row parity
    return out.reshape(b, 2 * h, 2 * w, out.shape[-1])


def upsample2x_conv(x_BHWC, kernel_HWIO, *, accumulate=None, for_cpu: bool = False):
    """`conv2d(nearest 2x upsample of x, kernel, padding=1)` for a 3x3 kernel; on CPU in float32 in the sub-pixel
    form (see the module note), the same numbers to float32 rounding."""
    h, w = x_BHWC.shape[1:3]
    if (for_cpu and x_BHWC.dtype == jnp.float32 and kernel_HWIO.shape[:2] == (3, 3)
            and h * w >= _SUBPIXEL_MIN_PIXELS):
        with jax.named_scope("cpu_subpixel_upsample"):  # named in the HLO: tests check where it is used
            return _subpixel_upsample_conv(x_BHWC, kernel_HWIO, accumulate)
    up = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
    return conv2d(up, kernel_HWIO, padding=1, accumulate=accumulate, for_cpu=for_cpu)
