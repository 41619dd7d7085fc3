"""Compositional generation (regional captions) against Lumina-T2X's compositional model: its guided forward
(fixtures/lumina_next_compositional_tiny, written by running the original code) equals one step of our
sampler with the regional caption rows of `lumina_jax.regions`, for one row and one column of cells."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reference import random_pipeline, relative_error

from lumina_jax import load_transformer
from lumina_jax.cli.sample import main as sample_main
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.regions import cell_of_tokens, regional_captions
from lumina_jax.sampling import FlowSchedule, SamplerOptions, sample

FIXTURES = Path(__file__).parent / "fixtures" / "lumina_next_compositional_tiny"
FLOAT32_BOUND = 1e-5
GRIDS = {"one_row": (1, 2), "one_column": (2, 1), "four_wide": (1, 4)}
PROMPTS = ["a red fox and a blue bird", "two animals in the snow"]
CELLS = ["a red fox", "a blue bird"]


@pytest.fixture(scope="module")
def original():
    return load_transformer(FIXTURES, "float32", progress=False), dict(np.load(FIXTURES / "io.npz"))


@pytest.mark.parametrize("case", list(GRIDS))
def test_guided_velocity_matches_the_original_compositional_model(original, case):
    model, io = original
    x, t = io[f"{case}_x"], float(io[f"{case}_t"])
    captions, masks = io[f"{case}_captions"], io[f"{case}_masks"]
    cells = cell_of_tokens(x.shape[2] // 2, x.shape[3] // 2, GRIDS[case])
    caption, mask, regions = regional_captions(
        io[f"{case}_global"][0], io[f"{case}_global_mask"][0], captions[:-1], masks[:-1], captions[-1], masks[-1], cells
    )
    one_step = FlowSchedule(np.float32([t]), np.float32([1.0]))  # x + 1 * velocity(x, t)
    out = sample(
        model,
        x,
        caption,
        mask,
        one_step,
        SamplerOptions(guidance_scale=4.0, scaling_watershed=0.3),
        caption_regions=regions,
    )
    assert relative_error(np.asarray(out) - x, io[f"{case}_out"][:1, :4]) <= FLOAT32_BOUND


def test_cells_are_numbered_row_by_row_and_must_be_whole():
    np.testing.assert_array_equal(cell_of_tokens(2, 4, (2, 2)).reshape(2, 4), [[0, 0, 1, 1], [2, 2, 3, 3]])
    with pytest.raises(ValueError, match="a 3x4 token grid does not split into 2x2 cells"):
        cell_of_tokens(3, 4, (2, 2))
    features, mask = np.zeros((2, 3, 5), np.float32), np.ones((2, 3), bool)
    with pytest.raises(ValueError, match="4 cells but 2 region captions"):
        regional_captions(features[0], mask[0], features, mask, None, None, cell_of_tokens(2, 2, (2, 2)))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    random_pipeline(folder, corpus=PROMPTS + CELLS)
    return folder, LuminaPipeline.from_pretrained(folder, dtype="float32", progress=False)


def test_one_cell_holding_the_prompt_is_text_to_image(pipeline):
    """Unguided, a 1x1 grid whose caption is the prompt attends and averages the same caption tokens."""
    _, pipe = pipeline
    kwargs = dict(prompt=PROMPTS[0], height=64, width=64, num_inference_steps=2, guidance_scale=1.0, seed=3)
    regional = pipe(region_prompts=[PROMPTS[0]], grid=(1, 1), output_type="latent", **kwargs).images
    assert relative_error(regional, pipe(output_type="latent", **kwargs).images) <= FLOAT32_BOUND


def test_each_image_keeps_its_own_rows(pipeline):
    """Several prompts and images per prompt: each image as drawn alone (the guided rows, then the negatives)."""
    _, pipe = pipeline
    kwargs = dict(height=64, width=128, num_inference_steps=2, region_prompts=CELLS, output_type="latent")
    together = pipe(prompt=PROMPTS, num_images_per_prompt=2, seed=[1, 2, 3, 4], **kwargs).images
    for i, seed in enumerate([1, 2, 3, 4]):
        alone = pipe(prompt=PROMPTS[i // 2], seed=seed, **kwargs).images
        assert relative_error(together[i : i + 1], alone) <= FLOAT32_BOUND
    swapped = pipe(prompt=PROMPTS[0], seed=1, **{**kwargs, "region_prompts": CELLS[::-1]}).images
    assert relative_error(swapped, together[:1]) > 0.01  # the cells' captions matter, and where they go


def test_regional_mistakes_are_explained(pipeline):
    _, pipe = pipeline
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="2 region prompts for a 2x2 grid"):
        pipe(region_prompts=CELLS, grid=(2, 2), height=64, width=64, **kwargs)
    with pytest.raises(ValueError, match="does not split into 1x3 cells"):
        pipe(region_prompts=CELLS + CELLS[:1], height=64, width=64, **kwargs)
    with pytest.raises(ValueError, match="grid is for compositional generation"):
        pipe(grid=(1, 2), height=64, width=64, **kwargs)


def test_sample_command_draws_regions(pipeline, tmp_path, capsys):
    folder, pipe = pipeline
    args = ["--model", str(folder), "--prompt", PROMPTS[0], "--steps", "2", "--dtype", "float32"]
    args += ["--height", "64", "--width", "128", "--out", str(tmp_path)]
    assert sample_main([*args, "--regions", *CELLS, "--grid", "1x2", "--seed", "5"]) == 0
    written = Image.open(tmp_path / "00000_5.png")
    expected = pipe(prompt=PROMPTS[0], height=64, width=128, num_inference_steps=2, seed=5, region_prompts=CELLS)
    assert np.abs(np.asarray(written, np.float32) - np.asarray(expected.images[0], np.float32)).max() <= 1
    assert json.loads(written.text["parameters"])["region_prompts"] == CELLS
    with pytest.raises(SystemExit, match="2"):
        sample_main([*args, "--regions", *CELLS, "--grid", "2x2"])
    assert "2 captions for a 2x2 grid" in capsys.readouterr().err
