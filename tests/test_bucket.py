"""A run in a bucket: data, cache and workdir under gs:// on a local GCS emulator (gcp-storage-emulator, see
gcs_emulator.py) that the tests start, reached as a real bucket is (etils.epath through gcsfs, Orbax through
TensorStore), each pointed at the emulator by its environment variable."""

import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import gcs_emulator
import numpy as np
import pytest
from etils import epath
from flax import nnx
from PIL import Image
from tensorboardX import record_writer
from test_train_loop import leaves, tensorboard_events, tiny_config, write_config_file

from lumina_jax import buckets
from lumina_jax.training import digits, loop
from lumina_jax.training.checkpoint import Checkpointer, abstract_train_state
from lumina_jax.training.config import TrainConfig
from lumina_jax.training.run_log import RunLog
from lumina_jax.weights import orbax_io

BUCKET = "lumina-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator on a free port, and this process's GCS clients pointed at it (children inherit that)."""
    port = free_port()
    url = f"http://localhost:{port}"
    command = [sys.executable, gcs_emulator.__file__, "start", "--port", str(port), "--in-memory", "--quiet"]
    log = tmp_path_factory.mktemp("emulator") / "log"  # a file: a pipe nobody reads would fill and stop the server
    with log.open("w") as output:
        server = subprocess.Popen([*command, "--default-bucket", BUCKET], stdout=output, stderr=output)
    settings = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath)
        "TENSORSTORE_GCS_HTTP_URL": url,  # Orbax's arrays
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore asks for no credentials then
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs would ask Google for the bucket's kind
    }
    previous = {name: os.environ.get(name) for name in settings}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
        os.environ.update(settings)
        yield f"gs://{BUCKET}"
    finally:
        for name, value in previous.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def base(emulator, tmp_path_factory) -> TrainConfig:
    """48 digits at 16x16 uploaded to the bucket, encoded into a cache there; the base pipeline stays local."""
    local = tmp_path_factory.mktemp("digits")
    digits.write_dataset(local / "data", size=16, limit=48)
    data = epath.Path(emulator) / "data"
    for file in (local / "data").rglob("*.*"):
        (data / file.relative_to(local / "data")).write_bytes(file.read_bytes())
    config = tiny_config(f"{emulator}/run", local / "base", data / digits.MANIFEST, f"{emulator}/cache")
    config = dataclasses.replace(config, save_every=2)
    digits.write_base_pipeline(config.pipeline, text_hidden=32)
    loop.prepare_data(config)
    return config


def committed_steps(checkpoints: epath.Path) -> list[int]:
    """The steps Orbax finished writing in a bucket: their folder holds commit_success.txt."""
    if not checkpoints.exists():
        return []
    return sorted(
        int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists()
    )


def metrics_by_step(workdir: epath.Path) -> dict[int, dict]:
    """metrics.jsonl by step; a step logged twice (after the last save of a killed run, then again resumed)
    counts as its last record."""
    return {record["step"]: record for record in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def final_state(config: TrainConfig):
    abstract = nnx.eval_shape(loop.transformer_factory(config))
    with Checkpointer(f"{config.workdir}/checkpoints", read_only=True) as checkpoints:
        return checkpoints.restore(abstract_train_state(abstract, loop.make_run_optimizer(config)))[0]


def test_a_run_killed_in_a_bucket_resumes_to_the_same_state(base, tmp_path):
    """python -m train with a gs:// workdir, killed (SIGKILL) once a checkpoint is in the bucket, resumes from
    it and ends where a run never interrupted ends: the same weights, EMA, optimizer state and losses."""
    killed = dataclasses.replace(base, workdir=f"{base.workdir}/killed", steps=1000)  # lr is constant after warm-up
    command = [
        sys.executable,
        "-m",
        "train",
        "--config",
        write_config_file(killed, tmp_path / "run.py"),
        "--no-progress",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    checkpoints, log = epath.Path(killed.workdir) / "checkpoints", tmp_path / "log"
    with log.open("w") as output:
        child = subprocess.Popen(command, env=env, stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + 600
        while not committed_steps(checkpoints) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.poll() is None, log.read_text()[-3000:]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    saved = committed_steps(checkpoints)
    assert saved and saved[-1] < 1000

    steps = saved[-1] + 3  # at least one save of the resumed run, and the export
    resumed = loop.train(dataclasses.replace(killed, steps=steps), progress=False)
    drawing = dict(sample_every=steps, sample_prompts=["a handwritten digit three"], sample_steps=2)
    uninterrupted = dataclasses.replace(base, workdir=f"{base.workdir}/straight", steps=steps, **drawing)
    straight = loop.train(uninterrupted, progress=False)
    assert resumed.start_step == saved[-1] and (resumed.step, straight.step) == (steps, steps)

    np.testing.assert_array_equal(
        *[
            leaves(final_state(dataclasses.replace(base, workdir=run)))
            for run in (killed.workdir, uninterrupted.workdir)
        ]
    )
    got, expected = metrics_by_step(epath.Path(killed.workdir)), metrics_by_step(epath.Path(uninterrupted.workdir))
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    assert [got[s]["loss"] for s in expected] == [expected[s]["loss"] for s in expected]
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (resumed.export / weights).read_bytes() == (straight.export / weights).read_bytes()
    assert (resumed.export / "model_index.json").exists() and (resumed.export / orbax_io.MARKER).exists()

    # TensorBoard's scalars and the samples, in the bucket too
    workdir = epath.Path(uninterrupted.workdir)
    events = tensorboard_events(workdir)
    scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}
    assert {step: scalars["train/loss", step] for step in expected} == pytest.approx(
        {step: record["loss"] for step, record in expected.items()}
    )
    (image,) = [v.image for e in events for v in e.summary.value if v.HasField("image")]
    sample = workdir / "samples" / f"{steps:08d}" / "00000_0.png"
    pixels = [np.asarray(Image.open(io.BytesIO(png))) for png in (image.encoded_image_string, sample.read_bytes())]
    np.testing.assert_array_equal(*pixels)


def test_the_run_log_uploads_its_events_through_the_runs_file_system(emulator, monkeypatch):
    """TensorBoard events reach the bucket as metrics.jsonl does, through etils.epath, never tensorboardX's own
    google-cloud-storage writer (which uploads again from its finalizer, retrying for minutes once the bucket is
    out of reach); nothing is left in the local temporary folder."""

    def refused(*args, **kwargs):
        raise AssertionError("tensorboardX's GCS writer was used")

    monkeypatch.setattr(record_writer.GCSRecordWriter, "__init__", refused)
    workdir = epath.Path(emulator) / "run-log"
    run_log = RunLog(workdir)
    run_log.metrics({"step": 1, "loss": 0.5})
    run_log.metrics({"step": 2, "loss": 0.25})
    local = run_log.events
    run_log.close()
    losses = {(v.tag, e.step): v.simple_value for e in tensorboard_events(workdir) for v in e.summary.value}
    assert losses == {("train/loss", 1): 0.5, ("train/loss", 2): 0.25} and not local.exists()


def listing(folder: epath.Path) -> list[str]:
    return [os.fspath(file)[len(os.fspath(folder)) + 1 :] for file in buckets.files_under(folder)]


class Cut(Exception):
    """The process stopping mid-upload."""


def test_an_export_cut_short_in_a_bucket_never_loads_as_whole(base, monkeypatch):
    """An export replacing an earlier one in a bucket, stopped after each of its uploads in turn, leaves a
    folder without model_index.json (a pipeline does not load without it) that --overwrite may replace; a
    folder not ours is never touched."""
    config = dataclasses.replace(base, workdir=f"{base.workdir}/export", steps=1)
    destination = loop.train(config, progress=False).export
    files = listing(destination)
    assert "model_index.json" in files and orbax_io.MARKER in files
    upload = orbax_io._upload
    for cut in range(len(files)):
        uploads = []

        def upload_until_cut(file, target):
            if len(uploads) == cut:
                raise Cut
            uploads.append(target)
            upload(file, target)

        monkeypatch.setattr(orbax_io, "_upload", upload_until_cut)
        with pytest.raises(Cut):
            loop.export_checkpoint(config, destination, overwrite=True)
        assert not (destination / "model_index.json").exists() and (destination / orbax_io.MARKER).exists(), cut
    monkeypatch.setattr(orbax_io, "_upload", upload)
    assert loop.export_checkpoint(config, destination, overwrite=True) == destination
    assert listing(destination) == files

    foreign = epath.Path(config.workdir) / "mine"
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier output of lumina-jax"):
        loop.export_checkpoint(config, foreign, overwrite=True)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
