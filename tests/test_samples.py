"""Samples while training drawn on the training mesh (tests/samples_checks.py, in its own process on 8
simulated CPU devices) against a one-device draw of the same EMA weights.

Sharding changes only the order of float32 sums (tests/test_sharding.py's bound, 2^-18 of the largest value,
holds the sampler's latents); through the VAE decoder the images keep it. Measured: 6e-7 on data=2 x fsdp=2 x
tensor=2, 0 on data=2 x fsdp=4, and the same PNGs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "samples_checks.py"
REORDERED_SUMS = 2.0**-18
MESHES = ["data2_fsdp2_tensor2", "data2_fsdp4"]


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-5000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_samples_on_the_training_mesh_are_the_one_device_samples(results, mesh):
    assert results["devices"] == 8
    drawn = results[mesh]
    # One image of each prompt with seed 0, in the step's folder as before: all of them, once.
    assert drawn["files"] == ["00000_0.png", "00001_0.png", "00002_0.png"]
    assert drawn["written"] == [*drawn["files"], "index.jsonl"]
    assert drawn["pixel_error"] == 0
    assert drawn["image_error"] <= REORDERED_SUMS


@pytest.mark.parametrize("mesh, weight_axes", [("data2_fsdp2_tensor2", 4), ("data2_fsdp4", 4)])
def test_the_ema_copy_that_samples_is_sharded_as_the_training_state(results, mesh, weight_axes):
    drawn = results[mesh]
    assert drawn["as_the_ema"] and drawn["dtypes"] == ["float32"]
    # A device holds about a quarter of it (the tiny model's modulation and norms stay whole), not all of it.
    assert 1 / weight_axes <= drawn["device_share"] < 1.5 / weight_axes


def test_the_ema_copy_is_cast_to_the_compute_dtype_shard_by_shard(results):
    cast = results["bfloat16"]
    assert cast["dtypes"] == ["bfloat16"]
    # bfloat16 halves the float32 EMA; fsdp=4 quarters it, but for what stays whole.
    assert cast["device_bytes"] < 1.5 * cast["full_float32_bytes"] / 2 / 4
