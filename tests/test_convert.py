"""`python -m convert`: diffusers and original checkpoints to our Orbax folder, written atomically."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from reference import TINY_NEXT_DIT, inputs, random_transformer, relative_error, transformer_forward

from lumina_jax import load_transformer
from lumina_jax.cli.convert import main
from lumina_jax.weights import orbax_io

ORIGINAL = Path(__file__).parent / "fixtures" / "lumina_next_original_tiny"
IO = dict(np.load(ORIGINAL / "io.npz"))


def run(model, x=IO["a_x"], t=IO["a_t"], caption=IO["a_cap"], mask=IO["a_cap_mask"]):
    return np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(caption), jnp.asarray(mask)))


def test_convert_original_then_load(tmp_path, capsys):
    assert main([str(ORIGINAL), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_size"] == 96
    converted = load_transformer(tmp_path / "out", progress=False)
    assert relative_error(run(converted)[:, :4], IO["a_out"]) <= 1e-5
    np.testing.assert_array_equal(run(converted), run(load_transformer(ORIGINAL, progress=False)))


def test_convert_diffusers_to_bfloat16(tmp_path):
    reference = random_transformer(seed=5, **TINY_NEXT_DIT)
    reference.save_pretrained(tmp_path / "diffusers")
    assert main([str(tmp_path / "diffusers"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    model = load_transformer(tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert model.layers.attention.to_q.kernel[...].dtype == jnp.bfloat16
    x, t, caption, mask = inputs(1, 2, 8, 8, 5, 32, [5, 1])
    assert relative_error(run(model, x, t, caption, mask), transformer_forward(reference, x, t, caption, mask)) <= 2e-2
    # stored bfloat16, loaded as float32: exactly the bfloat16 values
    as_float32 = load_transformer(tmp_path / "bf16", dtype="float32", progress=False)
    np.testing.assert_array_equal(
        np.asarray(as_float32.layers.feed_forward.up.kernel[...]),
        np.asarray(model.layers.feed_forward.up.kernel[...]).astype(np.float32),
    )


def test_ema_flag(tmp_path):
    assert main([str(ORIGINAL), str(tmp_path / "ema"), "--ema"]) == 0
    ema = load_transformer(ORIGINAL, ema=True, progress=False)
    np.testing.assert_array_equal(run(load_transformer(tmp_path / "ema", progress=False)), run(ema))


def test_refusals_speak_to_the_user(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main([str(ORIGINAL), str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(ORIGINAL), str(tmp_path / "taken"), "--overwrite"]) == 0
    assert orbax_io.is_converted(tmp_path / "taken")


def test_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def fail(folder, params):
        (folder / "params").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(orbax_io, "save_params", fail)
    with pytest.raises(OSError, match="disk full"):
        main([str(ORIGINAL), str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_a_killed_conversion_never_leaves_a_loadable_half(tmp_path):
    """Kill the converter at several moments; the destination is either absent or complete."""
    source = tmp_path / "diffusers"
    random_transformer(
        seed=2,
        hidden_size=256,
        num_layers=6,
        num_attention_heads=4,
        num_kv_heads=2,
        multiple_of=64,
        cross_attention_dim=128,
    ).save_pretrained(source)
    repo = Path(__file__).resolve().parents[1]
    outcomes = set()
    for delay in (0.5, 2.0, 4.0, 60.0):
        out = tmp_path / f"out_{delay}"
        process = subprocess.Popen(
            [sys.executable, "-m", "convert", str(source), str(out)],
            cwd=repo,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        if out.exists():
            outcomes.add("complete")
            load_transformer(out, progress=False)  # loads whole
        else:
            outcomes.add("absent")
    assert "complete" in outcomes  # the last run was given time to finish


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_overwrite_never_deletes_what_we_did_not_write(tmp_path, monkeypatch, capsys):
    """--overwrite refuses a destination that holds the source, the working directory or foreign files, and
    deletes nothing; it replaces an earlier output of ours."""
    models = tmp_path / "models"
    shutil.copytree(ORIGINAL, models / "original")
    (models / "notes.txt").write_text("mine")
    work = models / "work"
    work.mkdir()
    (work / "run.log").write_text("today's")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    refusals = [
        (models, "is or contains the source"),  # an ancestor of SRC and of the working directory
        (models / "original", "is or contains the source"),
        (work, "is or contains the working directory"),
        (Path(".."), "is or contains the source"),
    ]
    for destination, why in refusals:
        assert main([str(models / "original"), str(destination), "--overwrite"]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: {destination} ") and why in error and error.count("\n") == 1, error
    monkeypatch.chdir(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    assert main([str(models / "original"), str(foreign), "--overwrite"]) == 2
    assert "not an earlier output of lumina-jax" in capsys.readouterr().err
    assert snapshot(tmp_path) == {**before, "foreign/thesis.tex": b"years of work"}
    # an earlier output of ours is replaced, and no temporary folder is left beside it
    ours = tmp_path / "ours"
    assert main([str(models / "original"), str(ours), "--ema"]) == 0
    assert (ours / orbax_io.MARKER).is_file()
    assert main([str(models / "original"), str(ours), "--overwrite"]) == 0
    np.testing.assert_array_equal(run(load_transformer(ours, progress=False)), run(load_transformer(ORIGINAL)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "models", "ours"]
