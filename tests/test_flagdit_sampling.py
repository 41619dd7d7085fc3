"""Sampling Flag-DiT as Lumina-T2I's demo does, against the original code's outputs (tests/fixtures/
lumina_t2i_original_tiny/): `forward_with_cfg`'s guided velocity (guidance on channels 0..2, NTK factor the
token ratio, proportional attention) and whole Euler and midpoint runs of its transport sampler."""

from pathlib import Path

import numpy as np
import pytest
from reference import relative_error

from lumina_jax import load_transformer
from lumina_jax.sampling import FlowSchedule, SamplerOptions, resolution_scale, sample, shifted_schedule

FIXTURES = Path(__file__).parent / "fixtures" / "lumina_t2i_original_tiny"
FLOAT32_BOUND = 1e-5
DEMO = dict(guidance_scale=4.0, scaling_watershed=0.0, proportional_attn=True)  # NTK at every step


@pytest.fixture(scope="module", params=["qk", "plain"])
def original(request):
    folder = FIXTURES / request.param
    return load_transformer(folder, "float32", progress=False), dict(np.load(folder / "io.npz"))


def test_the_demo_settings_follow_from_the_model(original):
    model, _ = original
    p, side = model.config.patch_size, 32 // model.config.patch_size  # image_size 256: 32 latent pixels a side
    assert model.config.base_sequence_length == side**2 + 2 * side
    assert resolution_scale(model, 8, 12) == pytest.approx((8 // p) * (12 // p) / side**2)  # the demo's ntk_factor


def test_guided_velocity_matches_forward_with_cfg(original):
    model, io = original
    one_step = FlowSchedule(np.float32([0.4]), np.float32([1.0]))  # x + 1 * velocity(x, 0.4)
    x = io["d_x"][:2]  # forward_with_cfg uses the first half of its batch for both halves
    out = np.asarray(sample(model, x, io["d_cap"], io["d_cap_mask"], one_step, SamplerOptions(**DEMO)))
    assert relative_error(out - x, io["d_out"][:2]) <= FLOAT32_BOUND


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_a_whole_run_matches_the_original_sampler(original, solver):
    model, io = original
    schedule = shifted_schedule(5, shift=4.0)  # the original's 6-point grid, time shifting 4
    out = sample(
        model, io["d_x"][:1], io["d_cap"][1:3], io["d_cap_mask"][1:3], schedule, SamplerOptions(solver=solver, **DEMO)
    )
    assert relative_error(out, io[f"e_{solver}"]) <= FLOAT32_BOUND
