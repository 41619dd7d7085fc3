"""Context Drop: off, the model is diffusers' exactly; on, window means of keys and values, output
shapes kept, and the output moves from the exact one by a bounded amount that shrinks as the
latents get smoother (redundant neighbours) and as the window gets smaller."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import TINY_NEXT_DIT, inputs, random_transformer, relative_error, transformer_forward

from lumina_jax import load_transformer
from lumina_jax.models.attention import ContextDrop, dual_attention

CONFIG = TINY_NEXT_DIT
LATENT = 32  # a 16x16 token grid
# Relative change of the velocity with window 2 on smooth latents, random weights: measured 0.092
# (window 4: 0.199; white-noise latents: 0.248 and 0.313).
SMOOTH_WINDOW_2_BOUND = 0.15


@nnx.jit(static_argnames="window")
def velocity(model, latents, timestep, caption, mask, window):
    return model(latents, timestep, caption, mask, context_drop=window)


@pytest.fixture(scope="module")
def reference_and_model(tmp_path_factory):
    reference = random_transformer(seed=3, **CONFIG)
    folder = tmp_path_factory.mktemp("context_drop")
    reference.save_pretrained(folder)
    return reference, load_transformer(folder, dtype="float32", progress=False)


def smooth_latents(seed: int) -> np.ndarray:
    """Unit-variance latents interpolated from a 4x4 grid: neighbouring tokens nearly alike, as in images."""
    coarse = np.random.default_rng(seed).standard_normal((2, 4, 4, 4)).astype(np.float32)
    latents = np.asarray(jax.image.resize(coarse, (2, 4, LATENT, LATENT), "bicubic"))
    return latents / latents.std()


def test_window_means_in_grid_order():
    rows, cols, window = 4, 6, 2
    tokens = np.random.default_rng(0).standard_normal((2, rows * cols, 3, 5)).astype(np.float32)
    grid = tokens.reshape(2, rows, cols, 3, 5)
    expected = [
        grid[:, r : r + window, c : c + window].mean(axis=(1, 2))
        for r in range(0, rows, window)
        for c in range(0, cols, window)
    ]
    merged = ContextDrop(rows, cols, window)(jnp.asarray(tokens))
    np.testing.assert_allclose(merged, np.stack(expected, axis=1), rtol=1e-6, atol=1e-6)


def test_merging_identical_neighbours_is_exact():
    """Merged keys each stand for window^2 tokens alike, so softmax over them needs no correction."""
    rows, cols, window, kv_heads, head_dim = 4, 4, 2, 2, 8
    rng = np.random.default_rng(1)
    per_window = rng.standard_normal((2, 2, rows // window, cols // window, kv_heads, head_dim)).astype(np.float32)
    # Every token of a window gets its window's key and value.
    key, value = (
        jnp.asarray(np.repeat(np.repeat(a, window, 1), window, 2).reshape(2, rows * cols, kv_heads, head_dim))
        for a in per_window
    )
    query = jnp.asarray(rng.standard_normal((2, rows * cols, 4, head_dim)).astype(np.float32))
    drop = ContextDrop(rows, cols, window)
    exact = dual_attention(query, key, value, scale=0.5, backend="xla")
    merged = dual_attention(query, drop(key), drop(value), scale=0.5, backend="xla")
    np.testing.assert_allclose(merged, exact, rtol=0, atol=1e-6 * np.abs(exact).max())


def test_off_is_diffusers_exactly(reference_and_model):
    reference, model = reference_and_model
    x, t, caption, mask = inputs(5, 2, LATENT, LATENT, 8, CONFIG["cross_attention_dim"], [8, 3])
    ours = velocity(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask), window=1)
    assert relative_error(ours, transformer_forward(reference, x, t, caption, mask)) <= 1e-5


def test_on_moves_the_output_a_bounded_amount(reference_and_model):
    _, model = reference_and_model
    noise, t, caption, mask = inputs(5, 2, LATENT, LATENT, 8, CONFIG["cross_attention_dim"], [8, 3])
    conditioning = (jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask))

    def change(latents, window):
        exact = velocity(model, jnp.asarray(latents), *conditioning, window=1)
        dropped = velocity(model, jnp.asarray(latents), *conditioning, window=window)
        assert dropped.shape == exact.shape == (2, 8, LATENT, LATENT)
        assert np.isfinite(np.asarray(dropped)).all()
        return relative_error(dropped, exact)

    smooth = smooth_latents(0)
    smooth_2, smooth_4, noise_2 = change(smooth, 2), change(smooth, 4), change(noise, 2)
    assert 0 < smooth_2 <= SMOOTH_WINDOW_2_BOUND
    assert smooth_2 < smooth_4  # a larger window merges more
    assert smooth_2 < noise_2  # redundant neighbours merge with less loss


def test_window_must_divide_the_grid(reference_and_model):
    _, model = reference_and_model
    x, t, caption, mask = inputs(0, 1, 12, 16, 4, CONFIG["cross_attention_dim"], [4])
    with pytest.raises(ValueError, match=r"positive divisor of both sides of the 6x8 token grid, got 4"):
        model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask), context_drop=4)


def test_no_token_mask_with_context_drop(reference_and_model):
    _, model = reference_and_model
    patches = jnp.zeros((1, 16, 4 * model.config.in_channels))
    rope = model.image_rope(8, 8)
    caption, mask = jnp.zeros((1, 4, CONFIG["cross_attention_dim"])), jnp.ones((1, 4), bool)
    with pytest.raises(
        ValueError, match=r"Context Drop needs the 16 tokens of one 4x4 grid per image and no token_mask"
    ):
        model.forward_tokens(
            patches, rope, jnp.ones((1, 16), bool), jnp.zeros(1), caption, mask, context_drop=ContextDrop(4, 4, 2)
        )


def test_splash_backend_matches_xla_with_and_without_context_drop(reference_and_model, tmp_path):
    """The whole model through Pallas splash attention (interpret mode here): caption gates, proportional
    attention, and merged keys (64, padded to the kernel's 128) as XLA computes them."""
    reference, xla = reference_and_model
    reference.save_pretrained(tmp_path)
    splash = load_transformer(tmp_path, dtype="float32", attention_backend="splash", progress=False)
    x, t, caption, mask = inputs(6, 2, LATENT, LATENT, 8, CONFIG["cross_attention_dim"], [8, 3])
    args = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask))
    for window in (1, 2):
        expected = velocity(xla, *args, window=window)
        assert relative_error(velocity(splash, *args, window=window), expected) <= 1e-5
