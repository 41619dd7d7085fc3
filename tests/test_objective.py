"""The rectified-flow objective against direct NumPy computations; timestep and caption-dropout statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lumina_jax.training.objective import drop_captions, interpolate, sample_timesteps, velocity_loss

FLOAT32_ULPS_2 = 2.0**-22  # two float32 ulps, relative: each output is one or two roundings away from exact
SAMPLES = 200_000
# Kolmogorov-Smirnov statistic a correct sampler exceeds with probability 1e-3 at this many samples
KS_BOUND = 1.95 / np.sqrt(SAMPLES)


def test_interpolation_and_velocity_target():
    rng = np.random.default_rng(0)
    noise, data = rng.standard_normal((2, 3, 5, 16), np.float32)
    t = np.array([0.0, 0.3, 1.0], np.float32)
    x_t, target = interpolate(jnp.asarray(noise), jnp.asarray(data), jnp.asarray(t))
    expected = t[:, None, None] * data.astype(np.float64) + (1 - t[:, None, None]) * noise
    np.testing.assert_allclose(x_t, expected, rtol=0, atol=FLOAT32_ULPS_2 * np.abs(expected).max())
    np.testing.assert_array_equal(x_t[0], noise[0])  # t = 0 is noise, t = 1 is data
    np.testing.assert_array_equal(x_t[2], data[2])
    np.testing.assert_array_equal(target, data - noise)


def test_velocity_loss_weighs_each_image_equally():
    rng = np.random.default_rng(1)
    prediction, target = rng.standard_normal((2, 3, 7, 16), np.float32)
    valid = [7, 2, 5]
    mask = np.arange(7)[None] < np.array(valid)[:, None]
    per_image = [np.mean((prediction[i, :n].astype(np.float64) - target[i, :n]) ** 2) for i, n in enumerate(valid)]
    loss = float(velocity_loss(jnp.asarray(prediction), jnp.asarray(target), jnp.asarray(mask)))
    assert abs(loss / np.mean(per_image) - 1) <= FLOAT32_ULPS_2 * 8  # sums of 112 terms in float32

    garbage = np.where(mask[..., None], prediction, np.float32(1e6))  # padding never enters the loss
    assert float(velocity_loss(jnp.asarray(garbage), jnp.asarray(target), jnp.asarray(mask))) == loss


@pytest.mark.parametrize("snr_type", ["uniform", "lognorm"])
def test_timestep_distributions(snr_type):
    sampled = sample_timesteps(jax.random.PRNGKey(0), SAMPLES, snr_type)
    assert sampled.dtype == jnp.float32 and sampled.shape == (SAMPLES,)
    t = np.asarray(sampled, np.float64)
    assert t.min() >= 0 and t.max() < 1
    if snr_type == "uniform":
        statistic = stats.kstest(t, "uniform").statistic
    else:  # t = sigmoid(u), u standard normal
        statistic = stats.kstest(np.log(t / (1 - t)), "norm").statistic
    assert statistic <= KS_BOUND
    assert not np.array_equal(t, np.asarray(sample_timesteps(jax.random.PRNGKey(1), SAMPLES, snr_type)))


def test_unknown_snr_type():
    with pytest.raises(ValueError, match="unknown snr_type 'cosine'"):
        sample_timesteps(jax.random.PRNGKey(0), 4, "cosine")


def test_caption_dropout_rate_and_dropped_rows():
    rng = np.random.default_rng(2)
    rows, length, width, rate = SAMPLES, 4, 3, 0.1
    caption = rng.standard_normal((rows, length, width), np.float32)
    mask = np.arange(length)[None] < rng.integers(1, length + 1, rows)[:, None]
    empty, empty_mask = rng.standard_normal((2, width), np.float32), np.array([True, False])
    dropped_caption, dropped_mask = (
        np.asarray(x) for x in drop_captions(jax.random.PRNGKey(0), caption, mask, empty, empty_mask, rate)
    )

    # the empty caption, padded to the batch's length with zeros and False
    padded_empty = np.concatenate([empty, np.zeros((length - 2, width), np.float32)])
    padded_mask = np.array([True, False, False, False])
    dropped = np.all(dropped_caption == padded_empty, axis=(1, 2))
    np.testing.assert_array_equal(dropped_mask[dropped], np.broadcast_to(padded_mask, (dropped.sum(), length)))
    np.testing.assert_array_equal(dropped_caption[~dropped], caption[~dropped])
    np.testing.assert_array_equal(dropped_mask[~dropped], mask[~dropped])
    # a binomial count: 5 standard deviations either side
    assert abs(dropped.mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / rows)


def test_caption_dropout_extremes_and_errors():
    rng = np.random.default_rng(3)
    caption, mask = rng.standard_normal((8, 4, 3), np.float32), np.ones((8, 4), bool)
    empty, empty_mask = rng.standard_normal((1, 3), np.float32), np.ones(1, bool)
    key = jax.random.PRNGKey(0)
    kept, kept_mask = drop_captions(key, caption, mask, empty, empty_mask, 0.0)
    np.testing.assert_array_equal(kept, caption)
    np.testing.assert_array_equal(kept_mask, mask)
    all_dropped, all_dropped_mask = drop_captions(key, caption, mask, empty, empty_mask, 1.0)
    np.testing.assert_array_equal(all_dropped[:, 0], np.broadcast_to(empty[0], (8, 3)))
    np.testing.assert_array_equal(all_dropped[:, 1:], 0)
    np.testing.assert_array_equal(all_dropped_mask, np.broadcast_to([True, False, False, False], (8, 4)))
    with pytest.raises(ValueError, match="does not fit"):
        drop_captions(key, caption, mask, np.zeros((5, 3), np.float32), np.ones(5, bool))
