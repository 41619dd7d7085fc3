"""JSONL manifests and the original trainer's multi-aspect crops."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumina_jax.training.data import Example, choose_crop_size, crop_sizes, load_image, read_manifest


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_manifest_reads_both_formats_and_resolves_paths(tmp_path):
    (tmp_path / "data").mkdir()
    manifest = write_lines(
        tmp_path / "data" / "train.jsonl",
        [
            {"path": "a.png", "prompt": "a cat"},
            {"image": "sub/b.png", "prompt": "a dog"},
            "",
            {
                "image": "/abs/c.png",
                "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "a cow"}],
            },
        ],
    )
    assert read_manifest(manifest) == [
        Example(tmp_path / "data" / "a.png", "a cat", 1),
        Example(tmp_path / "data" / "sub" / "b.png", "a dog", 2),
        Example(Path("/abs/c.png"), "a cow", 4),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a.png", "a cat"]', "expected a JSON object"),
        ('{"path": "a.png"}', '"prompt"'),
        ('{"prompt": "a cat"}', '"path" or "image"'),
        ('{"path": "a.png", "prompt": ["a cat", "a kitten"]}', "one string"),
        ('{"image": "a.png", "conversations": [{"value": "a cat"}]}', "two turns"),
        ('{"path": "a.png", "conversations": [{"value": "?"}, {"value": "a cat"}]}', '"image" key'),
        ('{"path": "", "prompt": "a cat"}', "non-empty string"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, line, message):
    manifest = write_lines(tmp_path / "bad.jsonl", [{"path": "ok.png", "prompt": "fine"}, line])
    with pytest.raises(ValueError, match=message) as error:
        read_manifest(manifest)
    assert f"{manifest}:2:" in str(error.value)


def original_crop_walk(num_tiles, tile, max_ratio=4.0):
    """The original `generate_crop_size_list`, restated: widths walk down from the tile budget while the
    height climbs as far as the budget allows; every (width, height) visited is kept."""
    sizes, wp, hp = [], num_tiles, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            sizes.append((hp * tile, wp * tile))  # as (height, width)
        if (hp + 1) * wp <= num_tiles:
            hp += 1
        else:
            wp -= 1
    return sizes


def test_crop_sizes_worked_by_hand():
    # 32 px -> a budget of 4 tiles of 16 px; (height, width) in the original's order, worked out on paper
    assert crop_sizes(32) == [(16, 64), (16, 48), (16, 32), (32, 32), (32, 16), (48, 16), (64, 16)]


@pytest.mark.parametrize("image_size", [64, 256, 512, 1024])
def test_crop_sizes_bounds_and_the_original_list(image_size):
    sizes = crop_sizes(image_size)
    assert sizes == original_crop_walk(round((image_size / 16) ** 2), 16)
    assert (image_size, image_size) in sizes
    for height, width in sizes:
        assert height % 16 == 0 and width % 16 == 0
        assert height * width <= image_size**2
        assert max(height, width) / min(height, width) <= 4.0


def test_crop_size_is_one_of_the_four_closest_aspects():
    sizes = crop_sizes(256)
    width, height = 300, 100
    distance = {s: abs(math.log(s[1] / s[0]) - math.log(width / height)) for s in sizes}
    ranked = sorted(sizes, key=distance.get)
    assert distance[ranked[3]] < distance[ranked[4]]  # no tie at the cut
    rng = np.random.default_rng(0)
    chosen = {choose_crop_size(width, height, sizes, rng) for _ in range(200)}
    assert chosen == set(ranked[:4])


def save_png(path, pixels):
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def test_load_image_of_the_crop_size_is_exact(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3))
    path = save_png(tmp_path / "square.png", pixels)
    out = load_image(path, [(64, 64)], np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out, pixels.astype(np.float32) / 127.5 - 1)


def test_load_image_crops_a_random_window(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (128, 64, 3))  # taller than the crop: no resize
    path = save_png(tmp_path / "tall.png", pixels)
    tops = set()
    for seed in range(12):
        out = load_image(path, [(64, 64)], np.random.default_rng(seed))
        matches = [t for t in range(65) if np.array_equal(out, pixels[t : t + 64].astype(np.float32) / 127.5 - 1)]
        assert len(matches) == 1
        tops |= set(matches)
        np.testing.assert_array_equal(out, load_image(path, [(64, 64)], np.random.default_rng(seed)))
    assert len(tops) > 1


def test_load_image_halves_large_images_with_box_filtering(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (128, 256, 3))
    path = save_png(tmp_path / "large.png", pixels)
    out = load_image(path, [(32, 64)], np.random.default_rng(0))  # two halvings reach the crop exactly
    block_means = pixels.reshape(32, 4, 64, 4, 3).mean(axis=(1, 3))
    # PIL's fixed-point box filter is within one level per halving; a bicubic 4x downscale is ~30 levels off
    assert np.abs((out + 1) * 127.5 - block_means).max() <= 2.0


def test_load_image_picks_a_crop_from_the_list(tmp_path):
    path = save_png(tmp_path / "wide.png", np.full((40, 100, 3), 255))
    sizes = crop_sizes(64)
    out = load_image(path, sizes, np.random.default_rng(3))
    assert out.shape[:2] in sizes and out.shape[1] > out.shape[0]
    np.testing.assert_array_equal(out, 1.0)


def test_load_image_errors_for_missing_and_corrupt_files(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    for name in ("missing.png", "corrupt.png"):
        with pytest.raises(OSError):
            load_image(tmp_path / name, crop_sizes(64), np.random.default_rng(0))
