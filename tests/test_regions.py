"""Compositional generation (regional captions) against Lumina-T2X's compositional model: its guided forward
(fixtures/lumina_next_compositional_tiny, written by running the original code) equals one step of our
sampler with the regional caption rows of `lumina_jax.regions`, for one row and one column of cells."""

from pathlib import Path

import numpy as np
import pytest
from reference import relative_error

from lumina_jax import load_transformer
from lumina_jax.regions import cell_of_tokens, regional_captions
from lumina_jax.sampling import FlowSchedule, sample

FIXTURES = Path(__file__).parent / "fixtures" / "lumina_next_compositional_tiny"
FLOAT32_BOUND = 1e-5
GRIDS = {"one_row": (1, 2), "one_column": (2, 1), "four_wide": (1, 4)}


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
        model, x, caption, mask, one_step, guidance_scale=4.0, scaling_watershed=0.3, caption_regions=regions
    )
    assert relative_error(np.asarray(out) - x, io[f"{case}_out"][:1, :4]) <= FLOAT32_BOUND


def test_cells_are_numbered_row_by_row_and_must_be_whole():
    np.testing.assert_array_equal(cell_of_tokens(2, 4, (2, 2)).reshape(2, 4), [[0, 0, 1, 1], [2, 2, 3, 3]])
    with pytest.raises(ValueError, match="a 3x4 token grid does not split into 2x2 cells"):
        cell_of_tokens(3, 4, (2, 2))
    features, mask = np.zeros((2, 3, 5), np.float32), np.ones((2, 3), bool)
    with pytest.raises(ValueError, match="4 cells but 2 region captions"):
        regional_captions(features[0], mask[0], features, mask, None, None, cell_of_tokens(2, 2, (2, 2)))
