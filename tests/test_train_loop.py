"""Training runs end to end on a small digits set: resume exactness, preemption, non-finite stops, export,
samples and TensorBoard events, CLI."""

import dataclasses
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import checkpoint_checks
import jax
import numpy as np
import pytest
from fake_hub import cache_repo
from flax import nnx
from PIL import Image
from tensorboardX.proto.event_pb2 import Event

from lumina_jax.cli.train import main as train_main
from lumina_jax.configs.digits_flag_dit import SIZES
from lumina_jax.models.flagdit import FlagDiT, FlagDiTConfig
from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.training import digits, loop
from lumina_jax.training.checkpoint import Checkpointer, abstract_train_state
from lumina_jax.training.config import TrainConfig
from lumina_jax.training.flops import train_step_flops

TINY = NextDiTConfig(
    sample_size=16,
    patch_size=4,
    in_channels=3,
    hidden_size=32,
    num_layers=2,
    num_attention_heads=2,
    num_kv_heads=1,
    multiple_of=16,
    learn_sigma=False,
    cross_attention_dim=32,
)

# The same sizes as a Flag-DiT (Lumina-T2I's transformer).
TINY_FLAG_DIT = FlagDiTConfig(**{f: getattr(TINY, f) for f in SIZES})


def tiny_config(workdir, pipeline, data, cache) -> TrainConfig:
    """A few steps of a tiny transformer on 16x16 digits, from scratch."""
    return TrainConfig(
        workdir=str(workdir),
        pipeline=str(pipeline),
        data=str(data),
        cache=str(cache),
        init="scratch",
        transformer=TINY,
        image_size=16,
        max_aspect=1.0,
        batch_size=8,
        steps=6,
        lr=1e-3,
        warmup_steps=2,
        ema_decay=0.9,
        compute_dtype="float32",
        log_every=1,
        save_every=3,
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> TrainConfig:
    """48 digits at 16x16, the base pipeline, and their cache: shared by every run below."""
    root = tmp_path_factory.mktemp("digits")
    digits.write_dataset(root / "data", size=16, limit=48)
    config = tiny_config(root / "run", root / "base", root / "data" / digits.MANIFEST, root / "cache")
    digits.write_base_pipeline(config.pipeline, text_hidden=32)
    loop.prepare_data(config)
    return config


def run(base: TrainConfig, workdir, **changes) -> loop.RunSummary:
    return loop.train(dataclasses.replace(base, workdir=str(workdir), **changes), progress=False)


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_state(base: TrainConfig, workdir):
    """The newest checkpoint of a run: parameters, EMA, optimizer state, step, RNG."""
    abstract = nnx.eval_shape(loop.transformer_factory(base))
    with Checkpointer(workdir / "checkpoints") as checkpoints:
        return checkpoints.restore(abstract_train_state(abstract, loop.make_run_optimizer(base)))[0]


def leaves(state) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(state)])


def test_resumed_run_matches_a_straight_run(base, tmp_path):
    straight = run(base, tmp_path / "straight")
    first = run(base, tmp_path / "resumed", steps=3)
    second = run(base, tmp_path / "resumed")  # picks up the checkpoint at step 3
    assert (straight.step, first.step, second.step) == (6, 3, 6)
    expected, got = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal([m["loss"] for m in got], [m["loss"] for m in expected])
    np.testing.assert_array_equal([m["grad_norm"] for m in got], [m["grad_norm"] for m in expected])
    np.testing.assert_array_equal(*[leaves(final_state(base, tmp_path / name)) for name in ("straight", "resumed")])
    # the exported EMA transformers are the same bytes
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (straight.export / weights).read_bytes() == (second.export / weights).read_bytes()
    assert [m["lr"] for m in expected][:3] == pytest.approx([5e-4, 1e-3, 1e-3])  # warm-up 2 steps


def test_exported_pipeline_samples(base, tmp_path):
    summary = run(base, tmp_path, steps=2)
    pipe = LuminaPipeline.from_pretrained(summary.export, dtype="float32", progress=False)
    assert pipe.vae is None and pipe.default_sample_size == 16
    images = pipe(prompt=["a handwritten digit three", "the number 7"], num_inference_steps=2, output_type="np")
    assert images.images.shape == (2, 16, 16, 3) and np.isfinite(images.images).all()


def test_a_flag_dit_trains_resumes_and_exports(base, tmp_path):
    """Lumina-T2I's transformer through the same loop: exact resume, an exported pipeline that samples."""
    straight = run(base, tmp_path / "straight", transformer=TINY_FLAG_DIT, steps=4)
    run(base, tmp_path / "resumed", transformer=TINY_FLAG_DIT, steps=2)
    resumed = run(base, tmp_path / "resumed", transformer=TINY_FLAG_DIT, steps=4)
    expected, got = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    np.testing.assert_array_equal([m["loss"] for m in got], [m["loss"] for m in expected])
    saved = TrainConfig(**json.loads((tmp_path / "resumed" / "config.json").read_text()))
    assert saved.transformer == TINY_FLAG_DIT
    pipe = LuminaPipeline.from_pretrained(resumed.export, dtype="float32", progress=False)
    assert isinstance(pipe.transformer, FlagDiT) and pipe.sampler_defaults()["schedule"] == "shifted"
    exported = jax.tree.leaves(nnx.state(pipe.transformer))
    straight_export = LuminaPipeline.from_pretrained(straight.export, dtype="float32", progress=False)
    np.testing.assert_array_equal(leaves(exported), leaves(jax.tree.leaves(nnx.state(straight_export.transformer))))
    images = pipe(prompt=["a handwritten digit three", "the number 7"], num_inference_steps=2, output_type="np")
    assert images.images.shape == (2, 16, 16, 3) and np.isfinite(images.images).all()


def test_a_fine_tune_resumes_as_its_files_say_whatever_the_pipelines_name(base, tmp_path, hub_cache):
    """A pipeline published under a released one's name (a fork, here a tiny one) is fine-tuned and resumed
    as its files say, not as the released architecture its name matches; config.json records the transformer
    trained, not the config's unused one."""
    fork = run(base, tmp_path / "fork", steps=2).export
    cache_repo(hub_cache, "someone/Lumina-Next-SFT-diffusers", fork)
    tune = dict(init="pretrained", pipeline="someone/Lumina-Next-SFT-diffusers", transformer=NextDiTConfig())
    run(base, tmp_path / "straight", steps=4, **tune)
    run(base, tmp_path / "resumed", steps=2, **tune)
    resumed = run(base, tmp_path / "resumed", steps=4, **tune)
    assert resumed.step == 4
    expected, got = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    np.testing.assert_array_equal([m["loss"] for m in got], [m["loss"] for m in expected])
    saved = TrainConfig(**json.loads((tmp_path / "resumed" / "config.json").read_text()))
    assert saved.transformer == TINY and saved.init == "pretrained"


def test_a_resumed_run_refuses_a_config_of_another_transformer(base, tmp_path):
    run(base, tmp_path, steps=2)
    with pytest.raises(ValueError, match="another transformer than the config's"):
        run(base, tmp_path, steps=4, transformer=dataclasses.replace(TINY, num_layers=3))


def tensorboard_events(workdir) -> list[Event]:
    """The events of the run's TensorBoard file (TFRecords: length, its CRC, an Event, the Event's CRC)."""
    (file,) = workdir.glob("events.out.tfevents.*")
    data, offset, events = file.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        events.append(Event.FromString(data[offset + 12 : offset + 12 + length]))
        offset += 12 + length + 4
    return events


def test_samples_of_the_ema_weights_and_tensorboard_events(base, tmp_path):
    prompts = ["a handwritten digit three", "the number 7", "nine"]
    summary = run(base, tmp_path, steps=4, sample_every=2, sample_prompts=prompts, sample_steps=3, sample_guidance=2.0)
    folders = [tmp_path / "samples" / f"{step:08d}" for step in (2, 4)]
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["00000_0.png", "00001_0.png", "00002_0.png", "index.jsonl"]
    drawn = {(f.parent.name, f.name): np.asarray(Image.open(f), np.int32) for f in tmp_path.glob("samples/*/*.png")}
    assert not np.array_equal(drawn["00000002", "00000_0.png"], drawn["00000004", "00000_0.png"])  # the EMA moved
    # The last samples are what `python -m sample` draws from the exported EMA weights.
    pipe = LuminaPipeline.from_pretrained(summary.export, dtype=base.compute_dtype, progress=False)
    expected = pipe(prompt=prompts, seed=[0] * 3, num_inference_steps=3, guidance_scale=2.0, height=16, width=16)
    for index, image in enumerate(expected.images):
        assert np.abs(drawn["00000004", f"{index:05d}_0.png"] - np.asarray(image, np.int32)).max() <= 1

    # Drawing samples changes nothing of the training: the same steps as a run without them.
    run(base, tmp_path / "plain", steps=4)
    np.testing.assert_array_equal(
        [m["loss"] for m in metrics(tmp_path)], [m["loss"] for m in metrics(tmp_path / "plain")]
    )

    events = tensorboard_events(tmp_path)
    scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}
    images = {(v.tag, e.step): v.image for e in events for v in e.summary.value if v.HasField("image")}
    for record in metrics(tmp_path):
        for name in ("loss", "grad_norm", "lr", "images_per_s", "steps_per_s", "skipped"):
            assert scalars[f"train/{name}", record["step"]] == pytest.approx(record[name], rel=1e-6)
    assert sorted(images) == [(f"samples/{i:02d}", step) for i in range(3) for step in (2, 4)]
    for (tag, step), image in images.items():
        pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)), np.int32)
        np.testing.assert_array_equal(pixels, drawn[f"{step:08d}", f"{int(tag[-2:]):05d}_0.png"])


def test_sample_settings_are_checked_before_the_run_starts(base, tmp_path):
    with pytest.raises(ValueError, match=r"sample_every=5: expected 0 \(no samples\), or a positive number"):
        run(base, tmp_path, sample_every=5)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])  # a preemption notice, a Ctrl-C
def test_a_signal_saves_and_stops_then_the_run_finishes(base, tmp_path, signum):
    log = tmp_path / "metrics.jsonl"
    handler = signal.getsignal(signum)

    def preempt_after_first_step():
        while not (log.exists() and log.read_text().strip()):
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    threading.Thread(target=preempt_after_first_step, daemon=True).start()
    summary = run(base, tmp_path, steps=1000)
    assert summary.preempted and 1 <= summary.step < 1000 and summary.export is None
    with Checkpointer(tmp_path / "checkpoints", keep=3, save_interval_steps=base.save_every) as checkpoints:
        assert checkpoints.latest_step() == summary.step
    assert signal.getsignal(signum) is handler  # the watcher put the previous handler back
    finished = run(base, tmp_path, steps=summary.step + 1)
    assert not finished.preempted and finished.step == summary.step + 1
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, summary.step + 2))


def test_a_run_of_non_finite_steps_stops_with_a_clear_error(base, tmp_path):
    # an absurd learning rate: after one update every loss overflows, and every later step is skipped
    with pytest.raises(loop.TrainingStopped, match="3 steps in a row had a non-finite"):
        run(base, tmp_path, lr=1e30, warmup_steps=0, max_consecutive_skips=3, steps=50)
    records = metrics(tmp_path)
    assert records[-1]["step"] == 4 and sum(r["skipped"] for r in records) == 3


def open_files() -> list[str]:
    """The paths this process holds open (Linux); the listing's own descriptor resolves to no file."""
    return [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]


def test_a_pipeline_folder_not_ours_in_the_workdir_stops_the_run_before_it_trains(base, tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an earlier output of lumina-jax"):
        run(base, tmp_path, steps=1)
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "pipeline" / "notes.txt").exists()


@pytest.mark.parametrize("failing", ["initial_transformer", "global_batch"])  # while initialising; at the first step
def test_a_failing_run_releases_what_it_opened(base, tmp_path, monkeypatch, failing):
    """The checkpointer (Orbax's threads), the metrics file and the SIGTERM handler, on any error."""
    opened = []

    class Recorded(Checkpointer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            opened.append(self)

        def close(self):
            self.closed = True
            super().close()

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(loop, "Checkpointer", Recorded)
    monkeypatch.setattr(loop, failing, fail)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="injected"):
        run(base, tmp_path)
    assert [c.closed for c in opened] == [True]
    assert signal.getsignal(signal.SIGTERM) is handler
    assert not [f for f in open_files() if f.startswith(str(tmp_path))]


def write_config_file(config: TrainConfig, path) -> str:
    """A config file for python -m train whose get_config() returns `config`."""
    path.write_text(
        "from lumina_jax.training.config import TrainConfig\n\n"
        f"def get_config():\n    return TrainConfig(**{dataclasses.asdict(config)!r})\n"
    )
    return str(path)


def test_cli_trains_from_a_config_file(base, tmp_path, capsys):
    config_file = write_config_file(
        dataclasses.replace(base, workdir=str(tmp_path / "run"), steps=2), tmp_path / "tiny.py"
    )
    assert train_main(["--config", str(config_file), "--no-progress", "steps=3"]) == 0
    assert "done: step 3" in capsys.readouterr().out
    assert train_main(["--config", str(config_file), "stepz=3"]) == 2
    assert "no field 'stepz'" in capsys.readouterr().err
    assert train_main(["--config", str(config_file), "steps=-5"]) == 2
    assert capsys.readouterr().err == "error: steps=-5: expected 1 or more\n"
    # The run is at step 3: steps=3 has nothing to train (it exports again), steps=2 is a mistake.
    assert train_main(["--config", str(config_file), "--no-progress", "steps=3"]) == 0
    assert "nothing to train: " in capsys.readouterr().out
    assert train_main(["--config", str(config_file), "steps=2"]) == 2
    assert "steps=2: nothing to train" in capsys.readouterr().err
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3]
    # Export: a step the run does not hold, a file where the folder goes
    assert train_main(["export", "--config", str(config_file), "--step", "999", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: no checkpoint of step 999 in ")
    (tmp_path / "file").write_text("")
    assert train_main(["export", "--config", str(config_file), "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_export_replaces_only_an_earlier_export_and_with_overwrite(base, tmp_path, capsys):
    run(base, tmp_path / "run", steps=1)  # writes run/pipeline, an export of ours
    config_file = write_config_file(dataclasses.replace(base, workdir=str(tmp_path / "run")), tmp_path / "tiny.py")
    export = ["export", "--config", config_file]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert train_main([*export, "--out", str(foreign), "--overwrite"]) == 2
    assert f"error: {foreign} is not an earlier output of lumina-jax" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    weights = tmp_path / "run" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"
    earlier = weights.stat().st_mtime_ns
    assert train_main(export) == 2
    assert "already exists; choose another output or pass --overwrite" in capsys.readouterr().err
    assert weights.stat().st_mtime_ns == earlier
    assert train_main([*export, "--overwrite"]) == 0
    assert weights.stat().st_mtime_ns != earlier
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # nothing left aside


def test_an_export_beside_a_save_in_flight_leaves_the_save_whole(base, tmp_path):
    """python -m train export mid-run reads the checkpoints and deletes nothing: the training's save in
    flight (here held before its rename, so that the export surely runs while it is a temporary folder) completes."""
    workdir = tmp_path / "run"
    run(base, workdir, steps=1)  # a checkpoint of step 1
    checkpoints = workdir / "checkpoints"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, checkpoint_checks.__file__, "saving", str(checkpoints)]
    saving = subprocess.Popen(
        command, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert saving.stdout.readline().strip() == checkpoint_checks.SAVING_MARKER, saving.stderr.read()[-3000:]
        (in_flight,) = [p for p in checkpoints.iterdir() if p.name.startswith("2.")]  # held before its rename
        config_file = write_config_file(dataclasses.replace(base, workdir=str(workdir)), tmp_path / "tiny.py")
        assert train_main(["export", "--config", config_file, "--step", "1", "--out", str(tmp_path / "out")]) == 0
        assert in_flight.is_dir()
        stdout, stderr = saving.communicate("rename\n", timeout=300)  # let the save finish
    finally:
        saving.kill()
    assert saving.returncode == 0 and checkpoint_checks.SAVED_MARKER in stdout, stderr[-3000:]
    with Checkpointer(checkpoints, read_only=True) as checkpointer:
        assert checkpointer.all_steps() == [1, 2]  # Orbax lists a step once it is whole


def test_mfu_counts_the_model_flops_of_each_step(base, tmp_path):
    run(base, tmp_path, steps=2, peak_flops=1e12)
    tokens = (base.image_size // TINY.patch_size) ** 2
    flops = train_step_flops(TINY, base.batch_size, tokens, 32)  # the digits' captions: the 32-token bucket
    for record in metrics(tmp_path):
        assert record["mfu"] == pytest.approx(flops * record["steps_per_s"] / (1e12 * jax.device_count()))


# python -m train, reporting what the compiler does with the train step: loaded from the persistent cache, or not.
# python -m train, printing each program the compiler looks up in the persistent cache; every program is cached
# (jax_persistent_cache_min_compile_time_secs 0, where the command keeps those of half a second and more), so a
# restart that compiles nothing looks up only hits.
WATCH_COMPILER = """
import logging, sys
import jax
from lumina_jax.cli import train

def use_compilation_cache(keep=train.use_compilation_cache):
    keep()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

class Report(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if "cache hit for" in message or "CACHE MISS for" in message:
            print("COMPILER:", message.split(" with key")[0], flush=True)

train.use_compilation_cache = use_compilation_cache
compiler = logging.getLogger("jax._src.compiler")
compiler.setLevel(logging.DEBUG)
compiler.addHandler(Report())
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_restarted_run_loads_its_train_step_from_the_persistent_cache(base, tmp_path):
    config_file = write_config_file(dataclasses.replace(base, workdir=str(tmp_path / "run")), tmp_path / "tiny.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LUMINA_JAX_CACHE": str(tmp_path / "cache")}

    def train(steps: int) -> list[str]:
        command = [sys.executable, "-c", WATCH_COMPILER, "--config", config_file, "--no-progress", f"steps={steps}"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return [line for line in done.stdout.splitlines() if line.startswith("COMPILER:")]

    assert "COMPILER: PERSISTENT COMPILATION CACHE MISS for 'jit_train_step'" in train(2)
    cached = sorted(path.name for path in (tmp_path / "cache" / "xla").iterdir())
    assert any(name.startswith("jit_train_step-") for name in cached)
    # A fresh process resuming at step 2 (as after a preemption) compiles nothing: every program, the step
    # among them, comes from the cache.
    restart = train(3)
    assert "COMPILER: Persistent compilation cache hit for 'jit_train_step'" in restart
    assert not [line for line in restart if "MISS" in line], restart
    assert sorted(path.name for path in (tmp_path / "cache" / "xla").iterdir()) == cached
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3]
