"""Rotary position embedding with real cos/sin tables, for any number of position axes.

Lumina-Next rotates adjacent pairs (x[2k], x[2k+1]) of each head. With n axes, pair
p = j * n + a turns by positions[a] * omega_j: the axes interleave, as the released weights expect.
omega_j = 1 / (theta * ntk_factor) ** (2j / (head_dim / n)) / linear_factor. Lumina-Image 2.0 instead gives
each axis its own width and puts the axes' pairs one after another, from tables (`axis_rope`).
Everything is float32; no complex numbers, which TPUs handle poorly.
"""

import jax
import jax.numpy as jnp
import numpy as np

ROPE_THETA = 10000.0


def grid_positions(height: int, width: int) -> np.ndarray:
    """(row, column) of each token of a row-major height x width grid: [height * width, 2]."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)


def rope_frequencies(
    positions: jax.Array,
    head_dim: int,
    *,
    linear_factor: float | jax.Array = 1.0,
    ntk_factor: float | jax.Array = 1.0,
    theta: float = ROPE_THETA,
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, each positions.shape[:-1] + (head_dim // 2,).

    positions: [..., n_axes]. The factors may be traced values, so one compiled program can
    switch between linear and NTK scaling per step.
    """
    n_axes = positions.shape[-1]
    if head_dim % (2 * n_axes):
        raise ValueError(f"RoPE over {n_axes} axes needs head_dim divisible by {2 * n_axes}, got {head_dim}")
    axis_dim = head_dim // n_axes
    exponents = jnp.arange(0, axis_dim, 2, dtype=jnp.float32) / axis_dim
    omega = 1.0 / (jnp.asarray(theta * ntk_factor, jnp.float32) ** exponents) / linear_factor
    angles = positions.astype(jnp.float32)[..., :, None] * omega  # [..., n_axes, axis_dim / 2]
    angles = jnp.swapaxes(angles, -1, -2).reshape(*positions.shape[:-1], head_dim // 2)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, head_dim] by cos/sin [B or 1, T, head_dim // 2]; float32 inside."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def axis_rope_tables(
    axes_dim: tuple[int, ...], axes_lens: tuple[int, ...], theta: float = ROPE_THETA
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per axis a, cos and sin of position * omega_j for positions < axes_lens[a] and j < axes_dim[a] / 2,
    omega_j = theta^(-2j / axes_dim[a]): [axes_lens[a], axes_dim[a] / 2] float32 each, computed in float64
    as diffusers' Lumina-Image 2.0 tables are (angles reach hundreds of radians)."""
    tables = []
    for dim, length in zip(axes_dim, axes_lens):
        omega = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.arange(length, dtype=np.float64)[:, None] * omega
        tables.append((np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)))
    return tuple(tables)


def axis_rope(tables: tuple[tuple[np.ndarray, np.ndarray], ...], positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [..., sum(axes_dim) / 2] of positions [..., n_axes] (ints) from `axis_rope_tables`: the axes'
    pairs follow each other (axis 0's first), not interleaved. A position past its table gives NaN."""
    cos, sin = (
        jnp.concatenate(
            [jnp.take(table[i], positions[..., a], axis=0, mode="fill") for a, table in enumerate(tables)], -1
        )
        for i in (0, 1)
    )
    return cos, sin
