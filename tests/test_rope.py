"""RoPE with real cos/sin tables against diffusers' complex tables, and its generalisation to n axes."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

from lumina_jax.models.rope import apply_rope, grid_positions, rope_frequencies


@pytest.mark.parametrize("head_dim, linear, ntk", [(72, 1.0, 1.0), (72, 2.5, 1.0), (16, 1.0, 3.0), (24, 1.3, 1.7)])
def test_two_axes_match_diffusers(head_dim, linear, ntk):
    rows, cols = 23, 37
    reference = get_2d_rotary_pos_embed_lumina(head_dim, rows, cols, linear_factor=linear, ntk_factor=ntk)
    cos, sin = rope_frequencies(jnp.asarray(grid_positions(rows, cols)), head_dim, linear_factor=linear, ntk_factor=ntk)
    np.testing.assert_allclose(np.asarray(cos), reference.real.reshape(rows * cols, -1).numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), reference.imag.reshape(rows * cols, -1).numpy(), atol=2e-6)


def test_rotation_matches_complex_multiplication():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 3, 16)).astype(np.float32)
    reference = get_2d_rotary_pos_embed_lumina(16, 3, 4, linear_factor=1.2, ntk_factor=1.0).reshape(12, 8)
    expected = torch.view_as_real(
        torch.view_as_complex(torch.from_numpy(x).reshape(2, 12, 3, 8, 2)) * reference[None, :, None]
    )
    cos, sin = rope_frequencies(jnp.asarray(grid_positions(3, 4))[None], 16, linear_factor=1.2)
    ours = apply_rope(jnp.asarray(x), cos, sin)
    np.testing.assert_allclose(np.asarray(ours), expected.reshape(x.shape).numpy(), atol=1e-5)


@pytest.mark.parametrize("n_axes", [1, 3])
def test_any_number_of_axes_interleaves_them(n_axes):
    head_dim, theta, ntk, linear = 24, 10000.0, 2.0, 1.5
    positions = np.random.default_rng(n_axes).integers(0, 50, (7, n_axes))
    cos, _ = rope_frequencies(jnp.asarray(positions), head_dim, linear_factor=linear, ntk_factor=ntk)
    axis_dim = head_dim // n_axes
    for pair in range(head_dim // 2):
        j, axis = divmod(pair, n_axes)
        omega = 1.0 / (theta * ntk) ** (2 * j / axis_dim) / linear
        np.testing.assert_allclose(np.asarray(cos[:, pair]), np.cos(positions[:, axis] * omega), atol=2e-5)


def test_head_dim_must_split_across_axes():
    with pytest.raises(ValueError, match="RoPE over 3 axes needs head_dim divisible by 6, got 16"):
        rope_frequencies(jnp.zeros((4, 3)), 16)
