"""Bad inputs to Next-DiT get errors that say what is wrong; configs are checked when built."""

import jax.numpy as jnp
import pytest
from flax import nnx

from lumina_jax import NextDiT, NextDiTConfig

CONFIG = NextDiTConfig(
    hidden_size=32, num_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, cross_attention_dim=16
)


@pytest.fixture(scope="module")
def model():
    return NextDiT(CONFIG, rngs=nnx.Rngs(0))


def call(model, x_shape, t_batch=2, caption_shape=(2, 5, 16), mask_shape=(2, 5)):
    return model(jnp.zeros(x_shape), jnp.zeros(t_batch), jnp.zeros(caption_shape), jnp.ones(mask_shape))


def test_a_valid_call(model):
    assert call(model, (2, 4, 6, 10)).shape == (2, 8, 6, 10)


def test_size_not_divisible_by_the_patch(model):
    with pytest.raises(ValueError, match=r"latent size 7x10 is not divisible by the patch size 2"):
        call(model, (2, 4, 7, 10))


def test_grid_beyond_the_rope_table(model):
    with pytest.raises(ValueError, match=r"a 385x1 token grid exceeds the RoPE table of 384x384"):
        call(model, (2, 4, 770, 2))


def test_wrong_channels(model):
    with pytest.raises(ValueError, match=r"hidden_states must be \[batch, 4, height, width\], got \(2, 3, 8, 8\)"):
        call(model, (2, 3, 8, 8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(t_batch=3), "timestep has batch size 3, hidden_states has 2"),
        (dict(caption_shape=(1, 5, 16), mask_shape=(1, 5)), "encoder_hidden_states has batch size 1"),
        (dict(mask_shape=(2, 6)), r"encoder_mask shape \(2, 6\) does not match the caption \(2, 5\)"),
        (dict(caption_shape=(2, 5, 15)), r"encoder_hidden_states must be \[batch, length, 16\]"),
    ],
)
def test_mismatched_conditioning(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        call(model, (2, 4, 8, 8), **kwargs)


def test_caption_keys_values_of_another_caption(model):
    other = model.caption_keys_values(jnp.zeros((2, 7, 16)))
    with pytest.raises(ValueError, match=r"caption_kv has shape \(1, 2, 2, 7, 1, 16\); .* gives \(1, 2, 2, 5, 1, 16\)"):
        model(jnp.zeros((2, 4, 8, 8)), jnp.zeros(2), jnp.zeros((2, 5, 16)), jnp.ones((2, 5)), caption_kv=other)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "not divisible by num_attention_heads"),
        (dict(hidden_size=24, num_attention_heads=4), "head_dim divisible by 4"),
        (dict(num_attention_heads=6, num_kv_heads=4, hidden_size=48), "not a multiple of num_kv_heads"),
    ],
)
def test_inconsistent_configs(fields, message):
    with pytest.raises(ValueError, match=message):
        NextDiTConfig(**fields)
