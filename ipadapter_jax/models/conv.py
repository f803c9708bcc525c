"""2-D convolution (NHWC activations, HWIO kernels) with a CPU-friendly input gradient.

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
faster). The kernel's gradient, needed only when a kernel trains, is XLA's. Whether the program is compiled
for CPU is the caller's static flag (`Conv2d.cpu_gemm_gradient`, set by `models/target.set_target`), never the
host's backend: a CPU host also compiles for TPUs.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
_KERNEL_TO_OUTPUT_RATIO = 4  # use the GEMM input gradient when the kernel is this many times the output


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


def _gemm_gradient_pays(x_BHWC, kernel_HWIO, stride: int, padding: int) -> bool:
    kh, kw, _, c_out = kernel_HWIO.shape
    same = kh == kw and kh % 2 == 1 and padding == (kh - 1) // 2 and kh > 1
    out_elems = x_BHWC.shape[0] * x_BHWC.shape[1] * x_BHWC.shape[2] * c_out
    return stride == 1 and same and kernel_HWIO.size >= _KERNEL_TO_OUTPUT_RATIO * out_elems


def conv2d(x_BHWC, kernel_HWIO, *, stride: int = 1, padding: int = 0, accumulate=None,
           cpu_gemm_gradient: bool = False):
    """`lax.conv_general_dilated` over NHWC/HWIO with symmetric padding; `cpu_gemm_gradient` (programs compiled
    for CPU only) allows the GEMM input gradient where it pays, see the module note."""
    if cpu_gemm_gradient and _gemm_gradient_pays(x_BHWC, kernel_HWIO, stride, padding):
        with jax.named_scope("cpu_gemm_conv"):  # named in the HLO: tests check where it is used
            return _same_conv(x_BHWC, kernel_HWIO, padding, accumulate)
    return _conv(x_BHWC, kernel_HWIO, stride, padding, accumulate)
