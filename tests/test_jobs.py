"""Batch sampling jobs: prompts files, one job per image, batches padded to one shape, atomic PNGs,
resuming, and each process's share (lumina_jax/jobs.py), on the shipped digits model."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumina_jax import jobs
from lumina_jax.assets import DIGITS_MODEL
from lumina_jax.pipeline import LuminaPipeline

DEFAULTS = dict(negative_prompt=None, seed=0, height=32, width=32, guidance=4.0, steps=3, num_images=1)


@pytest.fixture(scope="module")
def pipe():
    return LuminaPipeline.from_pretrained(DIGITS_MODEL, "float32", progress=False)


def test_plain_text_is_one_prompt_a_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a handwritten digit one\n\n  a handwritten digit two  \n")
    assert jobs.read_requests(path) == [{"prompt": "a handwritten digit one"}, {"prompt": "a handwritten digit two"}]


def test_jsonl_lines_carry_their_own_settings(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "a handwritten digit one", "seed": 7, "num_images": 2, "guidance": 2},
        {"prompt": "a handwritten digit two", "negative_prompt": "a three", "steps": 5, "height": 64},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    made = jobs.make_jobs(jobs.read_requests(path), DEFAULTS)
    assert [(j.line, j.seed, j.guidance, j.steps, j.height, j.negative_prompt) for j in made] == [
        (0, 7, 2.0, 3, 32, None),
        (0, 8, 2.0, 3, 32, None),
        (1, 0, 4.0, 5, 64, "a three"),
    ]
    assert [j.file_name for j in made] == ["00000_7.png", "00000_8.png", "00001_0.png"]


@pytest.mark.parametrize(
    "name, text",
    [
        ("prompts.json", '["a handwritten digit one", {"prompt": "a handwritten digit two", "seed": 7}]'),
        ("prompts.json", '[\n  "a handwritten digit one",\n  {"prompt": "a handwritten digit two", "seed": 7}\n]\n'),
        ("prompts.txt", '\ufeff["a handwritten digit one", {"prompt": "a handwritten digit two", "seed": 7}]'),
        (
            "prompts.txt",
            '\ufeff{"prompt": "a handwritten digit one"}\n{"prompt": "a handwritten digit two", "seed": 7}',
        ),
        ("prompts.json", '{"prompt": "a handwritten digit one"}\n{"prompt": "a handwritten digit two", "seed": 7}'),
    ],
)
def test_json_arrays_and_files_behind_a_bom_are_read_as_json(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert jobs.read_requests(path) == [
        {"prompt": "a handwritten digit one"},
        {"prompt": "a handwritten digit two", "seed": 7},
    ]


def test_plain_text_behind_a_bom_or_opening_with_a_bracket_stays_plain_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeff[sketch] a handwritten digit one\na handwritten digit two\n", encoding="utf-8")
    assert jobs.read_requests(path) == [
        {"prompt": "[sketch] a handwritten digit one"},
        {"prompt": "a handwritten digit two"},
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ('["a digit", 3]', r"prompts.json: item 1: expected a JSON object with a \"prompt\", got 3"),
        ('[{"prompt": "a digit", "steps": "many"}]', 'prompts.json: item 0: "steps" must be an integer'),
        ('[\n "a digit",\n]', r"prompts.json:3: not JSON"),
        ("[]", "prompts.json has no prompts"),
        ('"a digit"', r"prompts.json:1: expected a JSON object"),
    ],
)
def test_bad_json_files_are_named(tmp_path, text, message):
    path = tmp_path / "prompts.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        jobs.read_requests(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x", "sed": 1}', "unknown fields \\['sed'\\]"),
        ('{"seed": 1}', 'no "prompt"'),
        ('{"prompt": "x", "steps": "30"}', '"steps" must be an integer'),
        ('{"prompt": "x", "guidance": true}', '"guidance" must be a number'),
        ('{"prompt": "x",', "not JSON"),
        ('["x"]', "expected a JSON object"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"prompts.jsonl:2: {message}"):
        jobs.read_requests(path)


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"num_images": 0}, "num_images must be at least 1"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"guidance": -1}, "guidance must be >= 0"),
        ({"seed": 2**32 - 1, "num_images": 2}, "seeds must lie in"),
    ],
)
def test_bad_settings_are_refused_before_any_work(request_, message):
    with pytest.raises(ValueError, match=message):
        jobs.make_jobs([{"prompt": "x", **request_}], DEFAULTS)


def test_null_fields_take_the_defaults():
    (job,) = jobs.make_jobs([{"prompt": "x", "height": None, "width": None, "negative_prompt": None}], DEFAULTS)
    assert (job.height, job.width, job.negative_prompt) == (32, 32, None)


def test_runs_beyond_max_images_are_refused_before_building_their_jobs():
    with pytest.raises(ValueError, match=f"100000001 images in one run; at most {jobs.MAX_IMAGES}"):
        jobs.make_jobs([{"prompt": "x", "num_images": 100_000_000}, {"prompt": "y"}], DEFAULTS)


def test_text_that_utf8_cannot_encode_is_refused(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a digit \\ud800"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: \"prompt\" 'a digit \\ud800' is not UTF-8 text"):
        jobs.read_requests(path)


def test_empty_or_unreadable_prompts_files_are_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="has no prompts"):
        jobs.read_requests(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        jobs.read_requests(tmp_path / "missing.txt")


def test_batches_group_settings_and_pad_the_last_with_its_last_job():
    made = jobs.make_jobs([{"prompt": "a", "num_images": 5}, {"prompt": "b", "steps": 9}, {"prompt": "c"}], DEFAULTS)
    got = [([(j.prompt, j.seed) for j in batch], real) for batch, real in jobs.batches(made, 4)]
    assert got == [
        ([("a", 0), ("a", 1), ("a", 2), ("a", 3)], 4),
        ([("a", 4), ("c", 0), ("c", 0), ("c", 0)], 2),
        ([("b", 0), ("b", 0), ("b", 0), ("b", 0)], 1),
    ]


def test_process_shares_cover_every_job_once(tmp_path, pipe):
    made = jobs.make_jobs([{"prompt": "a handwritten digit five", "num_images": 5}], DEFAULTS)
    for index in range(2):
        jobs.run_jobs(pipe, made, tmp_path, per_call=2, process_index=index, process_count=2, progress=False)
    shares = [
        [json.loads(line)["file"] for line in (tmp_path / f"index.{i}-of-2.jsonl").read_text().splitlines()]
        for i in range(2)
    ]
    assert shares == [["00000_0.png", "00000_2.png", "00000_4.png"], ["00000_1.png", "00000_3.png"]]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(shares[0] + shares[1])


def test_batched_images_equal_one_at_a_time(tmp_path, pipe):
    """A job's image does not depend on its batch: 3 jobs per call (one padded) against one per call."""
    requests = [
        {"prompt": "a handwritten digit seven", "num_images": 2, "seed": 3},
        {"prompt": "a handwritten digit four", "negative_prompt": "a handwritten digit nine"},
    ]
    made = jobs.make_jobs(requests, DEFAULTS)
    jobs.run_jobs(pipe, made, tmp_path / "batched", per_call=4, progress=False)
    jobs.run_jobs(pipe, made, tmp_path / "single", per_call=1, progress=False)
    for job in made:
        batched = np.asarray(Image.open(tmp_path / "batched" / job.file_name), np.int16)
        single = np.asarray(Image.open(tmp_path / "single" / job.file_name), np.int16)
        assert np.abs(batched - single).max() <= 1, job


def test_skip_existing_draws_only_what_is_missing_and_the_index_lists_all(tmp_path, pipe):
    made = jobs.make_jobs([{"prompt": "a handwritten digit two", "num_images": 3}], DEFAULTS)
    first = jobs.run_jobs(pipe, made[:2], tmp_path, per_call=2, progress=False, metadata={"model": "digits"})
    assert (first.written, first.skipped) == (2, 0)
    kept = (tmp_path / "00000_0.png").stat().st_mtime_ns
    (tmp_path / ".00000_2.png.partial-deadbeef").write_bytes(b"half a png")  # left by a killed run
    second = jobs.run_jobs(
        pipe, made, tmp_path, per_call=2, skip_existing=True, progress=False, metadata={"model": "digits"}
    )
    assert (second.written, second.skipped) == (1, 2)
    assert (tmp_path / "00000_0.png").stat().st_mtime_ns == kept
    assert not list(tmp_path.glob(".*partial*"))
    index = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [(r["file"], r["seed"], r["steps"], r["prompt"]) for r in index] == [
        (f"00000_{i}.png", i, 3, "a handwritten digit two") for i in range(3)
    ]


def test_an_image_being_written_is_not_named_png(tmp_path, monkeypatch):
    """Whoever globs *.png while a job runs (a viewer, a killed job's check) sees whole images only."""
    moved = []
    monkeypatch.setattr(jobs.os, "replace", lambda src, dst: moved.append(Path(src).name) or os.rename(src, dst))
    jobs.write_png(Image.new("RGB", (8, 8)), tmp_path / "00003_1.png", {"seed": 1})
    assert len(moved) == 1 and moved[0].startswith(".00003_1.png.partial-") and not moved[0].endswith(".png")
    assert Image.open(tmp_path / "00003_1.png").text["seed"] == "1"


def test_skip_existing_redraws_images_drawn_with_other_settings(tmp_path, pipe):
    """A line inserted in the prompts file moves every later prompt to another file name: the old images
    there are drawn again, not kept under the new prompts; an image of the job's settings is kept."""
    run = lambda prompts, **kwargs: jobs.run_jobs(  # noqa: E731
        pipe, jobs.make_jobs([{"prompt": p} for p in prompts], DEFAULTS), tmp_path, per_call=2, progress=False, **kwargs
    )
    run(["a handwritten digit two", "a handwritten digit three"])
    kept = (tmp_path / "00001_0.png").stat().st_mtime_ns
    (tmp_path / "00002_0.png").write_bytes(b"not a png")
    inserted = ["a handwritten digit one", "a handwritten digit two", "a handwritten digit three"]
    again = run(inserted, skip_existing=True)
    assert (again.written, again.skipped) == (3, 0)
    assert (tmp_path / "00001_0.png").stat().st_mtime_ns != kept
    index = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    for record, prompt in zip(index, inserted, strict=True):
        assert json.loads(Image.open(tmp_path / record["file"]).text["parameters"])["prompt"] == prompt
        assert record["prompt"] == prompt
    kept = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    unchanged = run(inserted, skip_existing=True)
    assert (unchanged.written, unchanged.skipped) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")} == kept
    other_model = run(inserted, skip_existing=True, metadata={"model": "another"})
    assert (other_model.written, other_model.skipped) == (3, 0)


def test_png_writes_are_atomic(tmp_path, monkeypatch):
    """A write that fails midway leaves neither the file nor its partial."""
    image = Image.new("RGB", (4, 4))

    def killed(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        jobs.write_png(image, tmp_path / "00000_0.png", {"seed": 0})
    assert os.listdir(tmp_path) == []
