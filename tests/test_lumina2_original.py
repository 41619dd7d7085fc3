"""Unified Next-DiT against the original Lumina-Image 2.0 code: two tiny checkpoints in its own layout, every
parameter random, their outputs and what the original sampler draws with the first (tests/fixtures/
lumina2_original_tiny/ and lumina2_original_tiny_gqa/, written by tests/fixtures/make_lumina2_original_tiny.py),
loaded through the real import path."""

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from reference import relative_error

from lumina_jax import load_transformer
from lumina_jax.models.dit_blocks import unpatchify
from lumina_jax.sampling import SamplerOptions, sample, shifted_schedule
from lumina_jax.weights.nextdit import convert_transformer

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "lumina2_original_tiny"
# Each fixture's architecture, as its constructor_args.json gives it to the original NextDiT: hidden size,
# layers, refiner layers, heads, kv heads, FFN width, RoPE axes, caption features, and the original code's
# query/key norms' epsilon (diffusers': 1e-5).
ARCHITECTURES = {
    "lumina2_original_tiny": (48, 2, 1, 2, 1, 96, (8, 8, 8), 40, 1e-6),
    "lumina2_original_tiny_gqa": (72, 1, 2, 4, 2, 288, (6, 6, 6), 33, 1e-6),
}
FLOAT32_BOUND = 1e-5
SAMPLING = dict(np.load(FIXTURE / "sampling.npz"))
SAMPLING_CASES = json.loads(str(SAMPLING.pop("cases")))  # the original sampler's settings, case by case


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def model_and_io(request):
    folder = FIXTURES / request.param
    return load_transformer(folder, progress=False), dict(np.load(folder / "io.npz")), folder


@pytest.fixture(scope="module")
def sampled_model():
    """The checkpoint the original sampler drew with."""
    return load_transformer(FIXTURE, progress=False)


def test_the_architecture_is_read_off_the_checkpoint(model_and_io):
    config, folder = model_and_io[0].config, model_and_io[2]
    sizes = (config.hidden_size, config.num_layers, config.num_refiner_layers, config.num_attention_heads)
    read = sizes + (config.kv_heads, config.ffn_dim, config.axes_dim_rope, config.cap_feat_dim, config.qk_norm_eps)
    assert read == ARCHITECTURES[folder.name]


def test_forward_matches_the_original(model_and_io):
    model, io, _ = model_and_io
    out = model(*(jnp.asarray(io[f"a_{k}"]) for k in ("x", "t", "cap", "cap_mask")))
    assert relative_error(out, io["a_out"]) <= FLOAT32_BOUND


def test_images_of_several_sizes_in_one_batch_match_the_original(model_and_io):
    model, io, _ = model_and_io
    images = [io[f"c_x{i}"] for i in range(sum(key.startswith("c_x") for key in io))]
    sequence = model.config.token_sequence([jnp.asarray(image) for image in images])
    out = model.forward_sequence(*sequence, *(jnp.asarray(io[f"a_{k}"]) for k in ("t", "cap", "cap_mask")))
    p = model.config.patch_size
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        ours = unpatchify(out[i : i + 1, : (h // p) * (w // p)], h, w, p)[0]
        assert relative_error(ours, io[f"c_out{i}"]) <= FLOAT32_BOUND, (h, w)


def test_converted_to_our_format_it_computes_the_same(model_and_io, tmp_path):
    model, io, folder = model_and_io
    convert_transformer(folder, tmp_path / "converted", progress=False)
    converted = load_transformer(tmp_path / "converted", progress=False)
    assert converted.config == model.config
    args = [jnp.asarray(io[f"a_{k}"]) for k in ("x", "t", "cap", "cap_mask")]
    np.testing.assert_array_equal(np.asarray(converted(*args)), np.asarray(model(*args)))


def original_sampler(case: dict, **changes) -> tuple:
    """The schedule and options that reproduce the original sampler's settings: its grid of `points` is
    points - 1 steps; guidance on every channel, no diffusers renormalisation."""
    options = SamplerOptions(
        guidance_scale=case["cfg_scale"],
        solver=case["solver"],
        cfg_trunc=case["cfg_trunc"],
        renorm_cfg=case["renorm_cfg"],
        cfg_all_channels=True,
        cfg_normalization=False,
        scaling_watershed=1.0,
    )
    return shifted_schedule(case["points"] - 1, shift=case["t_shift"]), dataclasses.replace(options, **changes)


@pytest.mark.parametrize("name", list(SAMPLING_CASES))
def test_the_original_sampler_is_reproduced(sampled_model, name):
    model, io = sampled_model, SAMPLING
    inputs = jnp.asarray(io["noise"]), jnp.asarray(io["cap"]), jnp.asarray(io["cap_mask"])
    case = SAMPLING_CASES[name]
    assert relative_error(sample(model, *inputs, *original_sampler(case)), io[name]) <= FLOAT32_BOUND
    # each of the original's guidance options changes the result here, so the match above proves it
    if case["cfg_trunc"] < 1:
        assert relative_error(sample(model, *inputs, *original_sampler(case, cfg_trunc=1.0)), io[name]) > 1e-3
    if case["renorm_cfg"] > 0:
        assert relative_error(sample(model, *inputs, *original_sampler(case, renorm_cfg=0.0)), io[name]) > 1e-3


def test_the_original_guidance_options_are_checked():
    for bad in (dict(cfg_trunc=-0.1), dict(renorm_cfg=float("nan")), dict(renorm_cfg=1.0, cfg_normalization=True)):
        with pytest.raises(ValueError, match="cfg_trunc|renorm_cfg"):
            SamplerOptions(**bad)
