"""Compositional generation, as Lumina-T2X's lumina_next_compositional_generation: an image split into a grid
of cells, one caption per cell, with no retraining.

The original runs the caption cross-attention once per cell caption, each image token allowed only its
own cell's caption, zeroes what the other cells give a token and sums (and conditions adaLN on a global
caption's mean). As each token sits in exactly one cell, that is one cross-attention over the cell
captions side by side, each token masked to its cell's part: the Next-DiT's `caption_regions`. So the
caption rows here are [global | cell 1 | ... | cell R] (the global caption's tokens masked for attention,
read only for the adaLN mean), and the negative row [global | negative | padding], every token attending
to the negative caption, its adaLN mean the global caption's too, as in the original.

Cells are numbered row by row (cell (r, c) is caption r * cols + c). The original numbers them
(r + 1) * (c + 1) - 1, which agrees for one row or one column of cells; for 2x2 it gives the top-right
caption the bottom-left cell too and leaves the third caption unused.
"""

import numpy as np


def cell_of_tokens(rows: int, cols: int, grid: tuple[int, int]) -> np.ndarray:
    """[rows * cols] the cell index of each image token (row-major) in a token grid split into grid cells."""
    grid_rows, grid_cols = grid
    if grid_rows < 1 or grid_cols < 1:
        raise ValueError(f"grid must be at least 1x1, got {grid_rows}x{grid_cols}")
    if rows % grid_rows or cols % grid_cols:
        raise ValueError(
            f"a {rows}x{cols} token grid does not split into {grid_rows}x{grid_cols} cells of whole tokens; "
            f"choose a height and width whose tokens (pixels / {{latent scale x patch}}) the grid divides"
        )
    r, c = np.meshgrid(np.arange(rows) // (rows // grid_rows), np.arange(cols) // (cols // grid_cols), indexing="ij")
    return (r * grid_cols + c).reshape(-1)


def regional_captions(
    global_features: np.ndarray,
    global_mask: np.ndarray,
    cell_features: np.ndarray,
    cell_masks: np.ndarray,
    negative_features: np.ndarray | None,
    negative_mask: np.ndarray | None,
    cells: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's caption rows: the global caption [L, D] and mask [L], R cell captions [R, L, D] and masks
    [R, L], the negative caption (or None, unguided) and `cells` (`cell_of_tokens`, T tokens).

    Returns caption [rows, (R + 1) L, D], mask [rows, (R + 1) L] (the global caption's tokens: what adaLN
    averages) and caption_regions [rows, T, (R + 1) L] (what each token attends to); rows is 2 with a
    negative caption (the guided row, then the negative's), else 1."""
    regions, length, dim = cell_features.shape
    if cells.max() >= regions:
        raise ValueError(f"the grid has {int(cells.max()) + 1} cells but {regions} region captions; give one per cell")
    width = (regions + 1) * length
    caption = np.concatenate([global_features[None], cell_features]).reshape(1, width, dim)
    pooled = np.zeros((1, width), bool)
    pooled[0, :length] = global_mask
    attended = np.zeros((1, len(cells), width), bool)
    for region in range(regions):
        tokens = np.flatnonzero(cells == region)
        attended[0, tokens, (region + 1) * length : (region + 2) * length] = cell_masks[region]
    if negative_features is None:
        return caption, pooled, attended
    negative = np.zeros((1, width, dim), caption.dtype)
    negative[0, :length], negative[0, length : 2 * length] = global_features, negative_features
    negative_attended = np.zeros((1, len(cells), width), bool)
    negative_attended[0, :, length : 2 * length] = negative_mask
    return (
        np.concatenate([caption, negative]),
        np.concatenate([pooled, pooled]),
        np.concatenate([attended, negative_attended]),
    )
