"""Schedules and solvers of the flow-ODE sampler, against diffusers' scheduler and a PyTorch re-statement
of the original sampler (torchdiffeq's fixed-grid midpoint over a time-shifted grid, DiT-style guidance)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from reference import TINY_NEXT_DIT, inputs, random_transformer, relative_error, transformer_forward

from lumina_jax import load_transformer
from lumina_jax.sampling import (
    SamplerOptions,
    diffusers_schedule,
    make_schedule,
    sample,
    shifted_schedule,
    sigmoid_schedule,
)


@pytest.mark.parametrize("steps, shift, sigmas", [(30, 1.0, None), (7, 3.0, None), (4, 2.0, [1.0, 0.7, 0.33, 0.1])])
def test_diffusers_schedule_is_the_schedulers(steps, shift, sigmas):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps, sigmas=sigmas)
    schedule = diffusers_schedule(steps, shift=shift, sigmas=sigmas)
    model_times = (1 - scheduler.timesteps / scheduler.config.num_train_timesteps).numpy()
    np.testing.assert_array_equal(schedule.times, model_times)
    sigmas = scheduler.sigmas.numpy()
    np.testing.assert_array_equal(schedule.steps, sigmas[:-1] - sigmas[1:])


def test_shifted_and_sigmoid_grids():
    shifted = shifted_schedule(4, shift=4.0)
    t = np.linspace(0, 1, 5)
    np.testing.assert_allclose(np.append(shifted.times, 1.0), t / (t + 4 - 4 * t), rtol=1e-6)
    sigmoid = sigmoid_schedule(8)
    grid = np.append(sigmoid.times, sigmoid.times[-1] + sigmoid.steps[-1])
    np.testing.assert_allclose(grid[[0, -1]], [0.0, 1.0], atol=1e-7)
    assert np.all(sigmoid.steps > 0)
    np.testing.assert_allclose(sigmoid.steps, sigmoid.steps[::-1], rtol=1e-5)  # symmetric: short at both ends
    assert sigmoid.steps[0] < sigmoid.steps[4] / 2
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        make_schedule("cosine", 4)
    with pytest.raises(ValueError, match="sigmas apply to the 'diffusers' and 'lumina2' schedules only"):
        make_schedule("shifted", 4, sigmas=[1.0, 0.5, 0.2, 0.1])


def original_sampler(model, x, caption, mask, grid, guidance, guided_channels):
    """Fixed-grid midpoint as torchdiffeq steps it, the model called as the original forward_with_cfg."""

    def velocity(x, t):
        out = transformer_forward(model, np.concatenate([x, x]), np.full(2 * len(x), t, np.float32), caption, mask)
        out = out[:, :4]
        cond, uncond = out[: len(x)], out[len(x) :]
        mixed = uncond + guidance * (cond - uncond)
        cond[:, :guided_channels] = mixed[:, :guided_channels]
        return cond

    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt = t1 - t0
        x = x + dt * velocity(x + 0.5 * dt * velocity(x, t0), t0 + 0.5 * dt)
    return x


@pytest.mark.parametrize("guided_channels", [3, 4])
def test_midpoint_over_the_shifted_grid_matches_the_original_sampler(tmp_path, guided_channels):
    reference = random_transformer(seed=4, sample_size=8, **TINY_NEXT_DIT)
    with torch.no_grad():  # a tame random velocity field keeps the comparison well conditioned
        reference.norm_out.linear_2.weight.mul_(0.1)
    reference.save_pretrained(tmp_path)
    x, _, caption, mask = inputs(2, 4, 8, 8, 6, 32, [6, 3, 1, 1])  # rows: 2 prompts, then 2 negative prompts
    x = x[:2]
    schedule = shifted_schedule(5, shift=4.0)
    grid = np.append(schedule.times, 1.0).astype(np.float32)
    expected = original_sampler(reference, x, caption, mask, grid, 4.0, guided_channels)
    ours = sample(
        load_transformer(tmp_path, progress=False),
        jnp.asarray(x),
        jnp.asarray(caption),
        jnp.asarray(mask),
        schedule,
        SamplerOptions(
            guidance_scale=4.0,
            solver="midpoint",
            scaling_watershed=1.0,
            proportional_attn=False,
            cfg_all_channels=guided_channels == 4,
        ),
    )
    assert relative_error(ours, expected) <= 1e-5
