"""The three data layouts (JSONL manifests, parquet data sets, image folders) and the original trainer's
multi-aspect crops."""

import concurrent.futures
import io
import json
import math
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as fsspec_registry
from PIL import Image

from lumina_jax.training.data import (
    Example,
    choose_crop_size,
    crop_sizes,
    fingerprint,
    load_image,
    read_examples,
    read_manifest,
)


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
        Example(str(tmp_path / "data" / "a.png"), "a cat", f"{manifest}:1"),
        Example(str(tmp_path / "data" / "sub" / "b.png"), "a dog", f"{manifest}:2"),
        Example("/abs/c.png", "a cow", f"{manifest}:4"),
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


def save_png(path, pixels) -> Example:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return Example(str(path), "a caption", str(path))


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
            load_image(Example(str(tmp_path / name), "", name), crop_sizes(64), np.random.default_rng(0))


def test_load_image_refuses_images_under_the_minimum_side(tmp_path):
    example = save_png(tmp_path / "small.png", np.zeros((20, 90, 3)))
    with pytest.raises(ValueError, match=r"small.png: 90x20 px, under the minimum side of 32 px"):
        load_image(example, crop_sizes(64), np.random.default_rng(0), min_side=32)
    assert load_image(example, crop_sizes(64), np.random.default_rng(0), min_side=20).shape[2] == 3


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_parquet_images_as_hugging_face_structs_bytes_or_paths(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "p.png").write_bytes(png_bytes(7))
    images = [png_bytes(i) for i in range(5)]
    structs = [
        {"bytes": images[0], "path": None},
        {"bytes": None, "path": "pics/p.png"},
        None,
        *({"bytes": b, "path": "ignored.png"} for b in images[3:]),
    ]
    table = pa.table({"image": pa.array(structs, IMAGE_STRUCT), "text": ["a", "b", "c", None, "e"]})
    pq.write_table(table, tmp_path / "structs.parquet", row_group_size=2)  # rows read across row groups
    examples = read_examples(tmp_path / "structs.parquet")
    assert [e.prompt for e in examples] == ["a", "b", "c", None, "e"]  # a missing caption is None: skipped later
    assert [e.where for e in examples] == [f"{tmp_path / 'structs.parquet'} row {i}" for i in range(5)]
    assert [examples[i].read_bytes() for i in (4, 0, 1, 3)] == [images[4], images[0], png_bytes(7), images[3]]
    with pytest.raises(ValueError, match=r"structs.parquet row 2: column 'image' holds no image"):
        examples[2].read_bytes()

    raw = pa.table({"picture": pa.array(images[:2], pa.binary()), "caption": ["x", "y"]})
    pq.write_table(raw, tmp_path / "raw.parquet")
    examples = read_examples(tmp_path / "raw.parquet", image_column="picture", caption_column="caption")
    assert [(e.read_bytes(), e.prompt) for e in examples] == [(images[0], "x"), (images[1], "y")]

    paths = pa.table({"image": ["pics/p.png"], "text": ["p"]})
    pq.write_table(paths, tmp_path / "paths.parquet")
    assert read_examples(tmp_path / "paths.parquet")[0].read_bytes() == png_bytes(7)


def test_a_folder_of_parquet_files_is_read_in_path_order_including_subfolders(tmp_path):
    for name, captions in (("b/train-1.parquet", ["c", "d"]), ("a/train-0.parquet", ["a", "b"])):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        images = pa.array([{"bytes": png_bytes(0), "path": None}] * 2, IMAGE_STRUCT)
        pq.write_table(pa.table({"image": images, "text": captions}), tmp_path / name)
    (tmp_path / "README.md").write_text("a data set card")
    assert [e.prompt for e in read_examples(tmp_path)] == ["a", "b", "c", "d"]


def test_an_image_folder_pairs_each_image_with_its_caption_file(tmp_path):
    for name in ("b.jpg", "a.png", "sub/deeper/c.webp", "sub/nocaption.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(png_bytes(1))
    for name, caption in (("b.txt", "a bee\n"), ("a.txt", "an ant"), ("sub/deeper/c.txt", " a cat ")):
        (tmp_path / name).write_text(caption)
    (tmp_path / "notes.txt").write_text("no image of this name")
    examples = read_examples(tmp_path)
    names = ["a.png", "b.jpg", "sub/deeper/c.webp", "sub/nocaption.png"]
    assert examples == [
        Example(str(tmp_path / n), p, str(tmp_path / n)) for n, p in zip(names, ["an ant", "a bee", "a cat", None])
    ]
    assert examples[0].read_bytes() == png_bytes(1)


def test_read_examples_errors_name_the_path_and_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such file or folder"):
        read_examples(tmp_path / "nowhere")
    (tmp_path / "data.csv").write_text("image,text\n")
    with pytest.raises(ValueError, match=r"data.csv: not a data set; expected a .jsonl manifest, a .parquet file"):
        read_examples(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no data set here: no .parquet files, and no images"):
        read_examples(tmp_path / "empty")
    pq.write_table(pa.table({"img": [b"x"], "caption": ["c"]}), tmp_path / "t.parquet")
    with pytest.raises(
        ValueError, match=r"t.parquet has no column 'image' \(columns: img, caption\); set image_column"
    ):
        read_examples(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"no column 'text' .*; set caption_column"):
        read_examples(tmp_path / "t.parquet", image_column="img")


def test_fingerprint_follows_images_and_captions_and_reads_no_image(tmp_path):
    examples = [Example(str(tmp_path / "missing.png"), "a cat", "m"), Example("x.parquet", "b", "x row 0", 0, "image")]
    assert fingerprint(examples) == fingerprint(list(examples))
    assert fingerprint(examples) != fingerprint([examples[0], Example("x.parquet", "b", "x row 1", 1, "image")])
    assert fingerprint(examples) != fingerprint([Example(str(tmp_path / "missing.png"), "a dog", "m"), examples[1]])
    assert fingerprint(examples) != fingerprint(examples[::-1])


@pytest.fixture
def bucket(monkeypatch):
    """gs://bucket on an in-memory file system that lists paths as gcsfs does: without the gs:// scheme."""

    class MemoryGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""
        store, pseudo_dirs = {}, [""]  # this test's own files

        @classmethod
        def _strip_protocol(cls, path):
            return fsspec.utils.stringify_path(path).removeprefix("gs://").removeprefix("gcs://").strip("/")

    monkeypatch.setitem(fsspec_registry, "gcs", MemoryGCS)  # as gcsfs registers itself, undone after
    epath.backend.fsspec_backend._get_filesystem.cache_clear()  # epath keeps one file system per scheme
    yield epath.Path("gs://bucket")
    epath.backend.fsspec_backend._get_filesystem.cache_clear()


def test_folders_in_a_bucket_keep_the_scheme_on_every_listed_path(bucket):
    for name, caption in (("photos/a.png", "an ant"), ("photos/sub/b.png", "a bee")):
        (bucket / name).parent.mkdir(parents=True, exist_ok=True)
        (bucket / name).write_bytes(png_bytes(1))
        (bucket / name).with_suffix(".txt").write_text(caption)
    examples = read_examples("gs://bucket/photos/")
    assert [(e.image, e.prompt) for e in examples] == [
        ("gs://bucket/photos/a.png", "an ant"),
        ("gs://bucket/photos/sub/b.png", "a bee"),
    ]
    assert examples[1].read_bytes() == png_bytes(1)

    (bucket / "parquet/a").mkdir(parents=True, exist_ok=True)
    images = pa.array([{"bytes": png_bytes(2), "path": None}] * 2, IMAGE_STRUCT)
    with (bucket / "parquet/a/train-0.parquet").open("wb") as f:
        pq.write_table(pa.table({"image": images, "text": ["c", "d"]}), f)
    examples = read_examples("gs://bucket/parquet")
    assert [(e.image, e.prompt) for e in examples] == [("gs://bucket/parquet/a/train-0.parquet", p) for p in "cd"]
    assert examples[1].read_bytes() == png_bytes(2)


def test_a_data_set_without_a_captioned_example_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    pq.write_table(
        pa.table({"image": pa.array([], pa.binary()), "text": pa.array([], pa.string())}), tmp_path / "e.parquet"
    )
    (tmp_path / "uncaptioned").mkdir()
    (tmp_path / "uncaptioned" / "a.png").write_bytes(png_bytes(1))
    pq.write_table(pa.table({"image": [png_bytes(1)], "text": pa.array([None], pa.string())}), tmp_path / "n.parquet")
    for data, count in (("empty.jsonl", 0), ("e.parquet", 0), ("uncaptioned", 1), ("n.parquet", 1)):
        with pytest.raises(ValueError, match=rf"^{tmp_path / data}: no example to train on: {count} examples, none"):
            read_examples(tmp_path / data)


def test_threads_reading_one_parquet_row_group_at_once_read_it_once(tmp_path, monkeypatch):
    images = [png_bytes(i) for i in range(8)]
    pq.write_table(pa.table({"image": images, "text": list("abcdefgh")}), tmp_path / "t.parquet", row_group_size=4)
    examples = read_examples(tmp_path / "t.parquet")
    arrived, reads, read_row_group = [], [], pq.ParquetFile.read_row_group

    def counting_read(self, group, **kwargs):  # waits until every thread asked for its row, so their misses overlap
        reads.append(group)
        while len(arrived) < len(examples):
            time.sleep(0.01)
        time.sleep(0.1)
        return read_row_group(self, group, **kwargs)

    def read(example):
        arrived.append(example)
        return example.read_bytes()

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting_read)
    with concurrent.futures.ThreadPoolExecutor(len(examples)) as pool:
        assert list(pool.map(read, examples)) == images
    assert sorted(reads) == [0, 1]
