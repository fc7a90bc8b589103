"""Model directories round-trip architecture and weights, and reject what they cannot read."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import checkpoint


class _Tiny(nn.Module):
    features: tuple = (4, 3)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for f in self.features:
            x = nn.Dense(f, dtype=self.dtype)(x)
        return x


# Checkpoints only instantiate classes from the jaxdissect package; pretend this one is.
_Tiny.__module__ = "jaxdissect.checkpoint"
checkpoint._Tiny = _Tiny


def test_round_trip(tmp_path):
    module = _Tiny()
    variables = module.init(jax.random.key(0), jnp.ones((1, 5)))
    checkpoint.save_model(str(tmp_path / "m"), module, variables, metadata={"labels": ["a", "b"]})
    loaded, restored = checkpoint.load_model(str(tmp_path / "m"))
    assert loaded == module
    x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    np.testing.assert_array_equal(loaded.apply(restored, x), module.apply(variables, x))
    assert checkpoint.load_metadata(str(tmp_path / "m")) == {"labels": ("a", "b")}
    bf16, _ = checkpoint.load_model(str(tmp_path / "m"), dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16


def test_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_model(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(checkpoint.CheckpointError, match="not a jaxdissect model directory"):
        checkpoint.load_model(str(tmp_path / "empty"))
    os.makedirs(tmp_path / "evil")
    (tmp_path / "evil" / "model.json").write_text(json.dumps(
        {"format": "jaxdissect-model", "version": 1, "class": "os.system", "config": {}, "metadata": {}}))
    with pytest.raises(checkpoint.CheckpointError, match="refusing"):
        checkpoint.load_model(str(tmp_path / "evil"))
    module = _Tiny()
    variables = module.init(jax.random.key(0), jnp.ones((1, 5)))
    checkpoint.save_model(str(tmp_path / "m"), module, variables)
    with pytest.raises(checkpoint.CheckpointError, match="not empty"):
        checkpoint.save_model(str(tmp_path / "m"), module, variables)
