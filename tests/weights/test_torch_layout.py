"""The tiled PyTorch -> Flax layout copy used while loading equals numpy's transpose exactly."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from ipadapter_jax.weights.torch_layout import flax_layout_copy, to_flax_layout


@pytest.mark.parametrize("shape", [(1000, 300), (97, 1000), (130, 70, 3, 3), (40, 1700, 3, 3), (3, 5), (8, 4, 1, 1)])
@pytest.mark.parametrize(("src", "dst"), [(np.float32, np.float32), (np.float32, np.float16),
                                          (np.float16, np.float32), (np.float32, ml_dtypes.bfloat16)])
def test_tiled_copy_is_numpys_transpose(shape, src, dst):
    array = np.random.default_rng(0).standard_normal(shape).astype(src)
    expected = np.ascontiguousarray(to_flax_layout("kernel", array), dtype=dst)
    axes = (1, 0) if len(shape) == 2 else (2, 3, 1, 0)
    got = flax_layout_copy(array, axes, dst)
    assert got.dtype == np.dtype(dst) and got.shape == expected.shape
    assert got.flags.c_contiguous and got.ctypes.data % 64 == 0
    np.testing.assert_array_equal(got, expected)


def test_untransposed_copy_converts_and_aligns():
    array = np.arange(10, dtype=np.float32)
    got = flax_layout_copy(array, None, np.float16)
    assert got.dtype == np.float16 and got.ctypes.data % 64 == 0
    np.testing.assert_array_equal(got, array.astype(np.float16))
