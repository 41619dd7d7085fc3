"""The training cache built by every process of a jax.distributed run and every device of each, as
`python -m train cache` builds it: the same cache as one process on one device, a killed build finished
by a rerun on another number of processes, and training starting on both processes afterwards, the two
drawing its samples together on the training mesh."""

import dataclasses
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from reference import digits_pipeline_with_vae

from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.training import digits
from lumina_jax.training.cache import open_cache
from lumina_jax.training.config import TrainConfig

SCRIPT = Path(__file__).parent / "cache_checks.py"
ROOT = Path(__file__).parent.parent
IMAGES, SHARD_SIZE = 30, 4  # 8 shards, the last one short

TINY = NextDiTConfig(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    num_layers=2,
    num_attention_heads=2,
    num_kv_heads=1,
    multiple_of=16,
    learn_sigma=False,
    cross_attention_dim=32,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> TrainConfig:
    """Digits at 32x32 px and a base pipeline with a VAE (two blocks: 16x16 latents) and a small Gemma."""
    root = tmp_path_factory.mktemp("distributed")
    digits.write_dataset(root / "data", size=32, limit=IMAGES)
    pipeline = digits_pipeline_with_vae(root / "base", text_hidden=32)
    return TrainConfig(
        workdir=str(root / "run"),
        pipeline=str(pipeline),
        data=str(root / "data" / digits.MANIFEST),
        cache=str(root / "unused"),
        init="scratch",
        transformer=TINY,
        image_size=32,
        max_aspect=1.0,
        cache_shard_size=SHARD_SIZE,
        cache_batch_size=1,
        batch_size=8,
        steps=2,
        compute_dtype="float32",
        log_every=1,
        save_every=100,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(config: TrainConfig, processes: int, devices: int, action: str = "cache", *extra: str) -> list:
    """`processes` processes of tests/cache_checks.py with `devices` CPU devices each."""
    path = Path(config.cache).parent / f"config-{Path(config.cache).name}-{action}.json"
    path.write_text(json.dumps(dataclasses.asdict(config)))
    port = free_port()
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    arguments = [str(path), str(processes), str(port), str(devices), action, *extra]
    return [
        subprocess.Popen([sys.executable, str(SCRIPT), arguments[0], str(rank), *arguments[1:]], **pipes)
        for rank in range(processes)
    ]


def finish(runs: list) -> list[dict]:
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0] * len(runs), [err[-3000:] for _, err in outputs]
    return [json.loads(out.splitlines()[-1]) for out, _ in outputs]


def build(base: TrainConfig, cache: Path, processes: int, devices: int) -> list[dict]:
    return finish(start(dataclasses.replace(base, cache=str(cache)), processes, devices))


def assert_same_cache(folder: Path, reference: Path, **tolerance) -> None:
    """Equal metadata and prompts; arrays equal, or within `tolerance` (assert_allclose's rtol, atol)."""
    built, expected = open_cache(folder), open_cache(reference)
    assert built.metadata == expected.metadata
    assert len(built) == len(expected) == IMAGES
    for i in range(len(expected)):
        got, want = built[i], expected[i]
        assert got.keys() == want.keys() == {"mean", "logvar", "caption", "prompt"}
        assert got["prompt"] == want["prompt"]
        for key in ("mean", "logvar", "caption"):
            if tolerance:
                np.testing.assert_allclose(got[key], want[key], **tolerance, err_msg=f"example {i}: {key}")
            else:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"example {i}: {key}")


@pytest.fixture(scope="module")
def one_device(base, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one") / "cache"
    assert build(base, folder, processes=1, devices=1) == [{"process": 0, "local_devices": 1}]
    return folder


@pytest.fixture(scope="module")
def four_devices(base, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("four") / "cache"
    assert build(base, folder, processes=1, devices=4) == [{"process": 0, "local_devices": 4}]
    return folder


def test_two_processes_of_four_devices_build_the_one_process_cache_then_train(base, one_device, four_devices, tmp_path):
    cache = tmp_path / "cache"
    results = build(base, cache, processes=2, devices=4)
    assert results == [{"process": 0, "local_devices": 4}, {"process": 1, "local_devices": 4}]
    # The same values as one process whose XLA CPU client has as many devices: who builds which shard, and
    # on how many devices a batch is split, change nothing.
    assert_same_cache(cache, four_devices)
    # One device: XLA's CPU client gives each device a share of the cores, and its convolutions sum in
    # another order with another thread count (measured: at most 5e-7 apart, on one device alone too).
    assert_same_cache(cache, one_device, rtol=1e-5, atol=2e-6)
    assert not list(cache.glob(".*")), "a temporary file was left behind"

    prompts = ["a three", "a seven", "a nine"]
    run = dataclasses.replace(
        base, cache=str(cache), workdir=str(tmp_path / "run"), sample_every=2, sample_prompts=prompts, sample_steps=2
    )
    trained = finish(start(run, processes=2, devices=4, action="train"))
    assert trained == [{"process": p, "step": 2, "devices": 8} for p in (0, 1)]
    # The samples at step 2, drawn on the training mesh of both processes' 8 devices, written once by process 0.
    samples = tmp_path / "run" / "samples" / "00000002"
    files = ["00000_0.png", "00001_0.png", "00002_0.png"]
    assert sorted(p.name for p in samples.iterdir()) == [*files, "index.jsonl"]
    assert [json.loads(line)["file"] for line in (samples / "index.jsonl").read_text().splitlines()] == files


def test_a_killed_build_is_finished_by_a_rerun_on_another_process_count(base, four_devices, tmp_path):
    cache = tmp_path / "cache"
    config = dataclasses.replace(base, cache=str(cache))
    runs = start(config, 2, 4, "cache", "--die-after-shards", "1")  # process 1 dies before its second shard
    assert runs[1].wait(timeout=600) == 9
    shard_count, stable_since = -1, time.monotonic()
    while runs[0].poll() is None and time.monotonic() - stable_since < 5:  # process 0 builds its share...
        count = len(list(cache.glob("shard-*.json")))
        shard_count, stable_since = count, stable_since if count == shard_count else time.monotonic()
        time.sleep(0.1)
    runs[0].kill()  # ...then waits for process 1 for ever: the job is killed
    runs[0].wait()
    assert not (cache / "cache.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.json")}
    assert 2 <= len(written) < IMAGES // SHARD_SIZE + 1
    with pytest.raises(FileNotFoundError, match="incomplete"):
        open_cache(cache)

    time.sleep(0.01)  # a rewritten shard would get a later modification time
    build(base, cache, processes=1, devices=4)
    assert_same_cache(cache, four_devices)
    assert {name: (cache / name).stat().st_mtime_ns for name in written} == written, "finished shards were redone"
