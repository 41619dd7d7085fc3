"""Sharded runs against one device, on 8 simulated CPU devices (tests/sharding_checks.py, in its own process).

Bounds. Sharding changes only the order of float32 sums: partial sums per shard, then an
all-reduce. Each reordered sum moves by a few units of float32 rounding of its terms; through the
two layers, their norms and the loss, the measured differences are 1 to 6 ulps (up to 6.4e-7 of the
largest value). We allow 32 ulps (2^-18 = 3.8e-6): room for other compilers' fusion choices, far
below what a wrong layout or a missing reduction gives (1e-3 and up).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from lumina_jax.models.layers import linear
from lumina_jax.sharding import (
    MESH_AXES,
    abstract_module,
    attention_partition,
    batch_sharding,
    mesh_partition_spec,
    report_replication,
    rows_sharding,
)

SCRIPT = Path(__file__).parent / "sharding_checks.py"
REORDERED_SUMS = 2.0**-18
SCALAR = 1e-6  # loss and gradient norm: one sum of squares over the batch each
TWO_ULPS = 2.0**-22
FORWARD_MESHES = ["data2_fsdp4", "fsdp8", "data2_fsdp2_tensor2"]
TRAINED_MESHES = ["data2_fsdp4", "fsdp8"]


@pytest.fixture(scope="module")
def results() -> dict:
    # Less LLVM optimisation: compiling dominates on these tiny programs, and the one-device
    # reference is compiled in the same process with the same options.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_mesh(results):
    assert results["devices"] == 8
    assert results["mesh_errors"] == {
        "{'data': 3}": "data=3 x tensor=1 does not divide the 8 devices",
        "{'data': 2, 'fsdp': 3}": "a mesh data=2 x fsdp=3 x tensor=1 does not divide the 8 devices",
    }


def test_released_model_layout(results):
    """2304 wide, 32 query and 8 kv heads of 72, FFN 6144: every matrix is split both ways."""
    for name in ("tensor8", "fsdp4_tensor2"):
        specs = results["released"][name]
        for projection in ("to_q", "to_k", "to_v", "to_k_caption", "to_v_caption"):
            assert specs[f"['layers']['attention']['{projection}']['kernel']"] == "P(None, 'fsdp', 'tensor')"
        assert specs["['layers']['attention']['to_out']['kernel']"] == "P(None, 'tensor', 'fsdp')"
        assert specs["['layers']['attention']['gate']"] == "P(None, 'tensor')"  # 32 heads over 8
        assert specs["['layers']['feed_forward']['gate']['kernel']"] == "P(None, 'fsdp', 'tensor')"
        assert specs["['layers']['feed_forward']['down']['kernel']"] == "P(None, 'tensor', 'fsdp')"
        assert specs["['layers']['modulation']['kernel']"] == "P(None, None, 'fsdp')"  # [cond, embed]: one fsdp
        assert specs["['time_linear_2']['kernel']"] == "P('fsdp', None)"  # [cond, cond]
        replicated = [param for param, spec in specs.items() if "fsdp" not in spec and "tensor" not in spec]
        assert replicated == ["['final_linear']['bias']"]  # 32 output features: too small to split


def test_dimensions_the_mesh_does_not_divide_are_replicated(results):
    specs = results["tiny_tensor8"]
    assert specs["['layers']['attention']['gate']"] == "P(None, None)"  # 4 query heads over 8 devices
    assert specs["['layers']['attention']['to_k']['kernel']"] == "P(None, 'fsdp', 'tensor')"  # 32 wide


@pytest.mark.parametrize("mesh", FORWARD_MESHES)
def test_sharded_forward_equals_one_device(results, mesh):
    assert results[mesh]["forward_error"] <= REORDERED_SUMS


def test_parameters_and_batches_are_sharded(results):
    # fsdp shards every parameter but the 32 final biases; tensor=2 halves heads and FFN again.
    assert 1 / 8 < results["fsdp8"]["param_fraction"] < 1 / 8 + 0.01
    assert 1 / 4 < results["data2_fsdp4"]["param_fraction"] < 1 / 4 + 0.01
    assert 1 / 4 < results["data2_fsdp2_tensor2"]["param_fraction"] < 0.4
    specs = results["data2_fsdp2_tensor2"]["param_specs"]
    assert specs["['layers']['attention']['to_q']['kernel']"] == "P(None, 'fsdp', 'tensor')"
    assert results["fsdp8"]["batch_fraction"] == results["data2_fsdp4"]["batch_fraction"] == 1 / 8
    assert results["data2_fsdp2_tensor2"]["batch_fraction"] == 1 / 4  # the batch is not split over tensor


@pytest.mark.parametrize("mesh", TRAINED_MESHES)
def test_sharded_training_step_equals_one_device(results, mesh):
    run = results[mesh]
    assert run["loss_error"] <= SCALAR and run["grad_norm_error"] <= SCALAR
    assert run["gradient_error"] <= REORDERED_SUMS  # of the largest gradient
    # Adam's first update is lr * g / (|g| + 1e-8). Where |g| >= 1e-5 a gradient error d moves
    # it by under 0.01 d, so the new parameters agree to the rounding of their own values. The
    # remaining ~3% of gradients are below 1e-5 (some are zero in exact arithmetic: the caption
    # key norm's bias shifts all logits of a query alike), and their updates are set by rounding.
    assert run["settled_fraction"] > 0.95
    assert run["settled_params_difference"] <= TWO_ULPS * run["params_magnitude"]
    assert run["ema_difference"] <= TWO_ULPS * run["params_magnitude"]


@pytest.mark.parametrize("mesh", TRAINED_MESHES)
def test_training_state_keeps_its_layout(results, mesh):
    run = results[mesh]
    assert run["params_laid_out_by_rules"] and run["optimizer_and_ema_laid_out_as_params"]
    assert run["state_fraction"] == pytest.approx(run["param_fraction"], abs=1e-3)


def test_sampling_under_a_mesh_equals_one_device(results):
    # 8 images with CFG (16 rows) split over the batch axes, the transformer over fsdp: 3 Euler steps
    assert results["pipeline"]["fsdp8"] <= REORDERED_SUMS
    assert results["pipeline"]["data2_fsdp4"] <= REORDERED_SUMS


def test_splash_attention_runs_per_device_under_a_mesh(results):
    """A Pallas kernel is opaque to XLA's partitioner: under data=2 x fsdp=2 x tensor=2 each device
    must get its own examples and heads (shard_map), and the results must still equal one device's
    XLA attention, forward and through a train step."""
    run = results["splash"]
    assert run["kernel_operand_splits"] == [
        '[{"data", "fsdp"}, {}, {"tensor"}, {}]',  # queries, keys, values: [B, L, heads, D]
        '[{"data", "fsdp"}, {}]',  # the key mask
        "[{}, {}, {}]",  # the kernel's own block tables, whole on every device
    ]
    assert run["forward_error"] <= REORDERED_SUMS
    assert run["loss_error"] <= SCALAR and run["grad_norm_error"] <= SCALAR
    assert run["gradient_error"] <= REORDERED_SUMS
    assert run["settled_params_difference"] <= TWO_ULPS * run["params_magnitude"]
    assert run["params_laid_out_by_rules"]


def test_attention_partition_splits_only_what_divides():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert attention_partition(sizes, 8, 4, 2) == (P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None))
    # 6 rows over 4 devices and 1 kv head over 2 do not divide: those dimensions stay whole
    assert attention_partition(sizes, 6, 4, 1) == (P(None, None, None, None), P(None, None))
    assert attention_partition({"data": 1, "fsdp": 8, "tensor": 1}, 16, 8, 8) == (
        P(("fsdp",), None, None, None),
        P(("fsdp",), None),
    )


def test_a_replicated_dimension_is_logged_once(caplog):
    mesh = AbstractMesh((1, 1, 8), MESH_AXES)
    with caplog.at_level("INFO", logger="lumina_jax.sharding"):
        for _ in range(3):
            assert mesh_partition_spec(P("q_heads"), (12,), mesh) == P(None)
        assert mesh_partition_spec(P("q_heads"), (16,), mesh) == P("tensor")
    assert [r.getMessage() for r in caplog.records] == [
        "a 'q_heads' dimension of 12 is replicated: the mesh's 'tensor' axis (8) does not divide it"
    ]


@pytest.mark.parametrize(
    "variables, message",
    [
        ({}, "Number of processes must be defined. Off a TPU pod slice or SLURM, set JAX_NUM_PROCESSES and"),
        ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' must be a whole number"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 must be less than JAX_NUM_PROCESSES=2"),
    ],
)
def test_a_coordinator_address_alone_says_what_else_to_set(variables, message):
    """Off a cluster JAX knows, JAX_COORDINATOR_ADDRESS needs the process count and index beside it
    (tests/test_sample_command.py starts two processes with all three). In a fresh process, as a command
    starts: JAX joins a cluster only before its first computation, which this process is long past."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": "localhost:1", **variables}
    start = "from lumina_jax.sharding import initialize_distributed; initialize_distributed()"
    run = subprocess.run([sys.executable, "-c", start], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and f"ValueError: {message}" in run.stderr, run.stderr[-3000:]


def test_replicated_parameters_beyond_the_tolerance_are_reported(caplog):
    """8 devices, as in MaxText's check: a dimension the mesh does not divide is held whole, 8 times what its
    rule asks; what no rule splits (a VAE's convolution) is meant whole, and data replicas are meant."""

    class Layers(nnx.Module):
        def __init__(self, with_whole: bool, rngs: nnx.Rngs):
            dense = dict(use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
            self.split = linear(64, 1024, ("embed", None), **dense)  # 64 / 8
            self.vae = linear(6, 1024, ("vae_in", None), **dense)  # no rule: whole by design
            if with_whole:
                self.whole = linear(6, 1024, ("embed", None), **dense)  # 6 cannot be split 8 ways

    state = nnx.state(abstract_module(lambda: Layers(True, nnx.Rngs(0))))
    fsdp8 = AbstractMesh((1, 8, 1), MESH_AXES)
    with caplog.at_level("WARNING", logger="lumina_jax.sharding"):
        share = report_replication(state, fsdp8)
    assert share == pytest.approx((64 / 8 + 6 + 6) / (64 / 8 + 6 / 8 + 6) - 1)  # 36% more than asked
    assert len(caplog.records) == 1 and caplog.records[0].levelname == "WARNING"
    assert "36% more parameters than their sharding rules ask for" in caplog.text and "['whole']" in caplog.text
    caplog.clear()
    assert report_replication(state, fsdp8, tolerance=0.4) == share and not caplog.records
    meant = nnx.state(abstract_module(lambda: Layers(False, nnx.Rngs(0))))
    assert report_replication(meant, fsdp8) == 0 and not caplog.records
    assert report_replication(meant, AbstractMesh((2, 4, 1), MESH_AXES)) == 0 and not caplog.records


def test_attention_that_cannot_split_its_batch_or_heads_warns(caplog):
    with caplog.at_level("WARNING", logger="lumina_jax.sharding"):
        attention_partition({"data": 2, "fsdp": 2, "tensor": 2}, 10, 6, 3)
    assert "a batch of 10 cannot be split 4 ways" in caplog.text
    assert "6 query and 3 kv heads cannot be split 2 ways" in caplog.text


def test_batch_rows_that_cannot_split_are_copied_with_a_warning(caplog):
    """The pipeline's rows (prompts, noise, latents) go over the batch axes, or whole to every device."""
    mesh = AbstractMesh((2, 2, 1), MESH_AXES)
    with caplog.at_level("WARNING", logger="lumina_jax.sharding"):
        assert rows_sharding(mesh, 8).spec == batch_sharding(mesh).spec and not caplog.records
        assert rows_sharding(mesh, 7).spec == P()
    assert "batch rows: a batch of 7 cannot be split 4 ways" in caplog.text


def test_a_lora_merges_into_sharded_weights_in_their_layout(results):
    """Merged per layer in each weight's sharding (no gathered copy), the values of a one-device merge."""
    lora = results["lora"]
    assert lora["laid_out_as_before"]
    assert lora["max_difference"] == 0.0
    assert lora["changed"] == ["layers.attention.to_k.kernel", "layers.feed_forward.gate.kernel"]


def test_lora_training_shards_the_adapters_and_keeps_the_frozen_weights_in_place(results):
    """One LoRA step on fsdp=8 (the frozen model sharded by the rules, dropout on) = the one-device step."""
    run = results["lora_training"]
    assert run["adapters_only"] == ["adapter"]
    assert run["loss_error"] <= SCALAR and run["grad_norm_error"] <= SCALAR
    assert run["gradient_error"] <= REORDERED_SUMS
    assert run["params_laid_out_by_rules"] and run["optimizer_and_ema_laid_out_as_params"]
    assert run["frozen_unchanged_in_its_layout"] and run["frozen_fraction"] < 0.2  # an eighth, and a few scales
