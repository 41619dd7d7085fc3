"""The training objective of the released model: rectified flow with velocity regression.

As the original trainer computes it (Lumina-T2X `lumina_next_t2i/transport`, linear path, velocity
prediction, train_eps 0): x_t = t * x1 + (1 - t) * x0 with x0 noise and x1 data, target x1 - x0, t uniform
in [0, 1) or logit-normal ("snr_type" "uniform" / "lognorm"), shifted towards the noise for Lumina-Image
2.0. The loss is the mean squared error over each image's own elements, averaged over the batch; of a
learn_sigma model's outputs only the velocity half enters it (the original drops the other half before the
loss, so it gets no gradient). Lumina-Image 2.0's trainer adds the same loss on the batch's latents
average-pooled 4 x 4 (`average_pool`), with its own noise and times. Captions are dropped to the empty
caption with probability 0.1 for classifier-free guidance. Everything here is a pure function of explicit PRNG keys.
"""

import math
from typing import Literal

import jax
import jax.numpy as jnp

SnrType = Literal["uniform", "lognorm"]
SNR_TYPES = ("uniform", "lognorm")
CAPTION_DROPOUT = 0.1


def sample_timesteps(
    key: jax.Array, batch: int, snr_type: SnrType = "uniform", shift: float | jax.Array = 1.0
) -> jax.Array:
    """t [batch] float32: uniform in [0, 1), or sigmoid of a standard normal ("lognorm"); then, for shift
    s != 1, moved towards the noise as Lumina-Image 2.0's trainer moves it (its transport's `time_shift`:
    the noise level 1 - t becomes s(1 - t) / (1 + (s - 1)(1 - t)), written here so that s = 1 is exact)."""
    if snr_type == "uniform":
        t = jax.random.uniform(key, (batch,), jnp.float32)
    elif snr_type == "lognorm":
        t = jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
    else:
        raise ValueError(f"unknown snr_type {snr_type!r}; choose one of {SNR_TYPES}")
    return t / (1 + (shift - 1) * (1 - t))


def resolution_time_shift(image_size: int) -> float:
    """Lumina-Image 2.0's training shift at image_size^2 pixels: exp(mu), mu linear in the image's tokens
    (image_size / 16)^2, from 0.5 at 256 tokens to 1.15 at 4096 (1024 px: e^1.15 = 3.16)."""
    tokens = (image_size // 16) ** 2
    return math.exp(0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256))


def interpolate(noise: jax.Array, data: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The point x_t on the straight path from noise (t = 0) to data (t = 1), and its velocity x1 - x0.

    noise and data [B, ...], t [B].
    """
    t = t.reshape(t.shape + (1,) * (data.ndim - 1))
    return t * data + (1 - t) * noise, data - noise


def pooled_latent_size(height: int, width: int, factor: int, patch_size: int) -> tuple[int, int]:
    """A latent's (height, width) after `average_pool`: each side divided by factor, the remainder dropped
    (as torch's avg_pool2d drops it), then cut to a whole number of patches."""
    return (height // factor) // patch_size * patch_size, (width // factor) // patch_size * patch_size


def average_pool(latent: jax.Array, factor: int, patch_size: int) -> jax.Array:
    """latent [C, H, W] (numpy or JAX) averaged over factor x factor blocks, as Lumina-Image 2.0's trainer
    pools its latents for its low-resolution loss (`F.avg_pool2d(latent, factor, factor)`). A pooled side
    that is not a whole number of patches loses its last rows or columns: the original model cannot take
    such a latent (its patchify views the latent as whole patches and fails)."""
    xp = latent.__array_namespace__()
    channels, height, width = latent.shape
    pooled_height, pooled_width = pooled_latent_size(height, width, factor, patch_size)
    blocks = latent[:, : pooled_height * factor, : pooled_width * factor]
    blocks = xp.reshape(blocks, (channels, pooled_height, factor, pooled_width, factor))
    return xp.mean(blocks, axis=(2, 4))


def velocity_loss(prediction: jax.Array, target: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Mean squared error over each sample's valid elements, then the mean over samples (float32 scalar).

    prediction and target [B, T, F]; token_mask [B, T] marks the tokens of each image in a padded
    batch. Each image weighs the same whatever its size, as in the original trainer.
    """
    error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    weights = token_mask.astype(jnp.float32)[..., None]
    per_sample = jnp.sum(error * weights, axis=(1, 2)) / (jnp.sum(weights, axis=(1, 2)) * error.shape[-1])
    return jnp.mean(per_sample)


def drop_captions(
    key: jax.Array,
    caption: jax.Array,
    caption_mask: jax.Array,
    empty_caption: jax.Array,
    empty_caption_mask: jax.Array,
    rate: float | jax.Array = CAPTION_DROPOUT,
) -> tuple[jax.Array, jax.Array]:
    """Replace each row's caption [B, L, D] and mask [B, L] with the empty caption's, with probability rate.

    empty_caption [L_e, D] and its mask [L_e] are the text encoder's output for "" (L_e <= L); they
    are padded to L with zeros and False, as the tokenizer would pad "" in a batch of longer captions.
    """
    length, empty_length = caption.shape[1], empty_caption.shape[0]
    if empty_length > length or empty_caption.shape[1:] != caption.shape[2:]:
        raise ValueError(
            f"the empty caption {empty_caption.shape} does not fit captions {caption.shape[1:]} (at most as long)"
        )
    pad = length - empty_length
    empty = jnp.pad(empty_caption.astype(caption.dtype), ((0, pad), (0, 0)))
    empty_mask = jnp.pad(empty_caption_mask.astype(caption_mask.dtype), (0, pad))
    dropped = jax.random.bernoulli(key, rate, (caption.shape[0],))
    return (
        jnp.where(dropped[:, None, None], empty[None], caption),
        jnp.where(dropped[:, None], empty_mask[None], caption_mask),
    )
