"""Loading helpers: the collector pause around loads, and placing a loaded model only where it is not yet placed."""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ipadapter_jax.generation.stages import Bound
from ipadapter_jax.models.layers import Linear
from ipadapter_jax.weights.pretrained import gc_paused


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_paused_restores_the_collector_even_on_error(enabled):
    seen = []

    @gc_paused
    def load(fail):
        seen.append(gc.isenabled())
        if fail:
            raise ValueError("bad file")
        return 7

    (gc.enable if enabled else gc.disable)()
    try:
        assert load(False) == 7 and gc.isenabled() == enabled
        with pytest.raises(ValueError, match="bad file"):
            load(True)
        assert gc.isenabled() == enabled and seen == [False, False]
    finally:
        gc.enable()


def test_bound_places_what_is_not_yet_placed():
    model = Linear(4, 3, rngs=nnx.Rngs(0))
    one = NamedSharding(Mesh(np.asarray(jax.devices()[:1]), ("data",)), P())
    kept = Bound.of(model, one)  # already on that device: the same arrays
    assert kept.state["kernel"][...] is model.kernel[...]
    assert len(jax.devices()) > 1  # the tests' fake CPU devices (conftest): replicated over all of them
    every = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P())
    placed = Bound.of(model, every)
    assert all(x.sharding.is_equivalent_to(every, x.ndim) for x in jax.tree.leaves(placed.state))
    np.testing.assert_array_equal(placed.state["kernel"][...], model.kernel[...])
