"""`python -m sample` as users run it, in fresh processes: bad flags, the same images on 8 simulated
devices as on one, two jax.distributed processes sharing the jobs, and a killed job resumed; and, in
this process (main), errors refused before any work or caught on the way."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from lumina_jax import jobs
from lumina_jax.cli.sample import main

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = [
    {"prompt": "a handwritten digit three", "num_images": 3, "seed": 10},
    {"prompt": "a handwritten digit eight", "negative_prompt": "a handwritten digit zero", "guidance": 2.5},
    {"prompt": "a handwritten digit one", "steps": 4, "num_images": 2},
    {"prompt": "a handwritten digit six, drawn quickly with a thick pen", "seed": 99},
]
JOBS = 7


def sample(args: list[str], devices: int = 1, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, "-m", "sample", *args]
    if popen:
        return subprocess.Popen(command, cwd=ROOT, env=env, **popen)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return path


@pytest.fixture(scope="module")
def one_device(prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_device")
    run = sample(["--prompts-file", str(prompts), "--steps", "3", "--out", str(out)])
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), np.int16)


def assert_same_images(folder: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.glob("*.png"))
    assert len(names) == JOBS and sorted(p.name for p in folder.glob("*.png")) == names
    for name in names:
        assert np.abs(pixels(folder / name) - pixels(reference / name)).max() <= 1, name


def test_one_device_writes_every_job_and_its_index(one_device):
    index = [json.loads(line) for line in (one_device / "index.jsonl").read_text().splitlines()]
    assert [r["file"] for r in index] == [
        "00000_10.png",
        "00000_11.png",
        "00000_12.png",
        "00001_0.png",
        "00002_0.png",
        "00002_1.png",
        "00003_99.png",
    ]
    assert index[3]["negative_prompt"] == "a handwritten digit zero" and index[3]["guidance"] == 2.5
    assert index[4]["steps"] == 4 and index[0]["steps"] == 3
    assert json.loads(Image.open(one_device / "00003_99.png").text["parameters"])["seed"] == 99


def test_eight_devices_draw_the_same_images(prompts, one_device, tmp_path):
    """8 simulated CPU devices, 2 images each per call: 16 a call, every settings' batch padded."""
    run = sample(["--prompts-file", str(prompts), "--steps", "3", "--batch-size", "2", "--out", str(tmp_path)], 8)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_images(tmp_path, one_device)
    assert f"wrote {JOBS} image(s)" in run.stdout


def test_two_processes_split_the_jobs_without_overlap(prompts, one_device, tmp_path):
    """Started as the README says for plain machines: the same command, with the coordinator's address,
    the process count and each one's index in the environment."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = ["--prompts-file", str(prompts), "--steps", "3", "--out", str(tmp_path)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env |= {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "sample", *args], cwd=ROOT, env={**env, "JAX_PROCESS_ID": str(rank)}, **pipes
        )
        for rank in range(2)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-3000:] for _, err in outputs]
    shares = [
        {json.loads(line)["file"] for line in (tmp_path / f"index.{rank}-of-2.jsonl").read_text().splitlines()}
        for rank in range(2)
    ]
    assert not shares[0] & shares[1]
    assert len(shares[0]) + len(shares[1]) == JOBS
    assert "process 1 of 2" in outputs[1][0]
    assert_same_images(tmp_path, one_device)


def test_a_killed_job_resumes_with_only_what_is_missing(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a handwritten digit {d}\n" for d in ("one two three four five six".split())) * 8)
    out = tmp_path / "out"
    args = ["--prompts-file", str(prompts), "--steps", "30", "--out", str(out)]
    run = sample(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.png"))) < 3 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 3 <= len(before) < 48, "the kill came too late to test resuming"
    for path in out.glob("*.png"):
        Image.open(path).load()  # every PNG there is whole
    resumed = sample([*args, "--skip-existing"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"wrote {48 - len(before)} image(s)" in resumed.stdout and f"{len(before)} already there" in resumed.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in before} == before
    assert len(list(out.glob("*.png"))) == 48 and not list(out.glob(".*"))
    assert len((out / "index.jsonl").read_text().splitlines()) == 48


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-images", "0"], "argument --num-images: expected a whole number >= 1, got '0'"),
        (["--num-images", "-1"], "argument --num-images: expected a whole number >= 1, got '-1'"),
        (["--steps", "0"], "argument --steps: expected a whole number >= 1"),
        (["--batch-size", "0"], "argument --batch-size: expected a whole number >= 1"),
        (["--guidance", "-2"], "argument --guidance: expected a number >= 0"),
        (["--guidance", "nan"], "argument --guidance: expected a number >= 0"),
        (["--seed", "-1"], "argument --seed: expected a whole number from 0 to 4294967295"),
        (["--height", "tall"], "argument --height: expected a whole number >= 1"),
        (["--scaling-watershed", "2"], "argument --scaling-watershed: expected a number from 0 to 1"),
        (["--mesh", "data=0"], "argument --mesh: 'data=0': expected data=N"),
        (["--prompts-file", "missing.txt"], "argument --prompts-file: missing.txt is not a file"),
    ],
)
def test_bad_flags_get_one_line_and_status_2(flags, message):
    if "--prompts-file" not in flags:
        flags = ["--prompt", "a handwritten digit two", *flags]
    run = sample(flags)
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1].startswith(f"python -m sample: error: {message}")
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("unwritable_out", "cannot write there (Not a directory)"),
        ("bad_jsonl", 'prompts.jsonl:1: "steps" must be an integer'),
        ("bad_size", "error: height and width must be multiples of 8 between 8 and"),
    ],
)
def test_bad_inputs_get_one_line_and_status_2(tmp_path, case, message):
    (tmp_path / "a_file").write_text("")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a handwritten digit two", "steps": "many"}))
    flags = {
        "unwritable_out": ["--prompt", "a digit", "--out", str(tmp_path / "a_file" / "out")],
        "bad_jsonl": ["--prompts-file", str(prompts)],
        "bad_size": ["--prompt", "a digit", "--height", "30"],
    }[case]
    run = sample(flags)
    assert run.returncode == 2
    assert message in run.stderr.splitlines()[-1]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", "a digit \udcff"], "argument --prompt: 'a digit \\udcff' is not UTF-8 text"),
        (["--prompt", "a digit", "--regions", "\udcff"], "argument --regions: '\\udcff' is not UTF-8 text"),
        (["--prompt", "a digit", "--num-images", "100000000"], "argument --num-images: at most 1000000 images a run"),
        (["--compile-only", "--topology", "v5e-1", "--json", "{tmp}/missing/plan.json"], "argument --json: cannot"),
        (["--compile-only", "--topology", "v5e-1", "--json", "{tmp}"], "argument --json: cannot write"),
    ],
)
def test_bad_flags_are_refused_at_parsing(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit:
        main([flag.format(tmp=tmp_path) for flag in flags])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"lumina-sample: error: {message}")


def test_a_context_drop_window_that_does_not_divide_the_token_grid_is_refused(tmp_path, capsys):
    assert main(["--prompt", "a digit", "--context-drop", "3", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: context_drop must divide both sides of the 4x4 token grid of 32x32 px")


def test_running_out_of_memory_on_a_cpu_gets_the_hint(tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):  # as XLA's CPU client reports it
        raise jax.errors.JaxRuntimeError("INTERNAL: Failed to allocate memory: 34359738368 bytes")

    monkeypatch.setattr(jobs, "run_jobs", out_of_memory)
    assert main(["--prompt", "a digit", "--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: out of memory (INTERNAL: Failed to allocate memory") and "--batch-size" in error
