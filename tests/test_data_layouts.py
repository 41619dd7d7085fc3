"""The digits recipe trained from each data layout people bring: its JSONL manifest, the same images and
captions as a Hugging Face parquet data set, and as an image folder with a caption file per image."""

import dataclasses
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lumina_jax.training import digits, loop
from lumina_jax.training.cache import open_cache
from lumina_jax.training.config import load_config

IMAGES = 96


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    """The digits data set as a JSONL manifest, a parquet data set (two files, image bytes in an Image
    struct, captions in "caption"), and an image folder; and the digits config reading the manifest."""
    root = tmp_path_factory.mktemp("layouts")
    config = load_config("digits", [f"workdir={root}/run", f"pipeline={root}/base", f"cache={root}/unused"])
    manifest = digits.write_dataset(root / "jsonl", size=config.image_size, limit=IMAGES)
    digits.write_base_pipeline(config.pipeline, text_hidden=config.transformer.cross_attention_dim)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]

    (root / "parquet" / "data").mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for part, rows in enumerate((records[: IMAGES // 3], records[IMAGES // 3 :])):
        images = [{"bytes": (manifest.parent / r["path"]).read_bytes(), "path": None} for r in rows]
        table = pa.table(
            {"image": pa.array(images, image_type), "caption": [r["prompt"] for r in rows]},
        )
        pq.write_table(table, root / "parquet" / "data" / f"train-{part:05d}-of-00002.parquet", row_group_size=16)

    for r in records:
        image = root / "folder" / r["path"]
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(manifest.parent / r["path"], image)
        image.with_suffix(".txt").write_text(r["prompt"] + "\n")

    base = dataclasses.replace(config, prepare=None, steps=40, log_every=5, save_every=1000, caption_column="caption")
    return {
        "jsonl": dataclasses.replace(base, data=str(manifest)),
        "parquet": dataclasses.replace(base, data=str(root / "parquet")),
        "folder": dataclasses.replace(base, data=str(root / "folder")),
    }


def train(config, name: str, root) -> list[float]:
    config = dataclasses.replace(config, cache=str(root / name / "cache"), workdir=str(root / name / "run"))
    loop.train(config, progress=False)
    assert open_cache(config.cache).metadata["examples"] == IMAGES
    return [json.loads(line)["loss"] for line in (root / name / "run" / "metrics.jsonl").read_text().splitlines()]


def test_every_layout_trains_the_digits_recipe_to_the_manifests_loss_curve(layouts, tmp_path):
    curves = {name: train(config, name, tmp_path) for name, config in layouts.items()}
    assert len(curves["jsonl"]) == 8 and np.isfinite(curves["jsonl"]).all()
    assert curves["jsonl"][-1] < curves["jsonl"][0]  # it learns
    # The same images and captions in the same order give the same cache, batches and steps: the same curve.
    assert curves["parquet"] == curves["jsonl"]
    assert curves["folder"] == curves["jsonl"]


def test_a_caption_column_that_does_not_exist_stops_before_any_work(layouts, tmp_path):
    config = dataclasses.replace(
        layouts["parquet"], caption_column="text", cache=str(tmp_path / "cache"), workdir=str(tmp_path / "run")
    )
    with pytest.raises(ValueError, match=r"no column 'text'.*caption"):
        loop.prepare_data(config)
    assert not (tmp_path / "cache").exists()
