"""Training checkpoints: round trip into train_step, keep-N and intervals, other meshes, a save killed
midway, and the SIGTERM watcher. Runs needing 8 devices or a kill use tests/checkpoint_checks.py."""

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
from checkpoint_checks import READY_MARKER, SAVING_MARKER, small_state
from sharding_checks import empty_caption, padded_batch, tiny_model

from lumina_jax.training.checkpoint import Checkpointer, PreemptionWatcher, abstract_train_state, to_nested_dict
from lumina_jax.training.step import ClippedAdamW, init_train_state, train_step

SCRIPT = Path(__file__).parent / "checkpoint_checks.py"
OPTIMIZER = ClippedAdamW(lr=1e-3)
EXTRA = {"data": {"epoch": 1, "position": 24, "seed": 0}, "config": {"lr": 1e-3, "name": "tiny"}}


def host(tree) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(tree)]


def assert_same_arrays(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def script(mode: str, *args, **popen) -> subprocess.Popen:
    flags = "--xla_force_host_platform_device_count=8" if mode == "meshes" else ""
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(SCRIPT), mode, *map(str, args)], env=env, text=True, **popen)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def test_round_trip_resumes_training_exactly(tmp_path):
    model = tiny_model()
    batch = padded_batch([(4, 6), (8, 8)])
    empty, empty_mask = empty_caption()

    graphdef, state = init_train_state(model, OPTIMIZER, jax.random.PRNGKey(3))
    # Compiled once, with less LLVM optimisation (a third of the compile time); called with the
    # arguments that are not static.
    step = train_step.lower(graphdef, state, batch, empty, empty_mask, optimizer=OPTIMIZER).compile(
        {"xla_backend_optimization_level": 0}
    )
    state, _ = step(state, batch, empty, empty_mask)  # the optimizer state and EMA now differ from the parameters
    saved = host(state)
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() is None
        assert checkpointer.save(1, state, EXTRA)
        # The step donates the state while the save may still be writing: Orbax must have copied it.
        continued, continued_metrics = step(state, batch, empty, empty_mask)
        continued = host(continued)
        checkpointer.wait_until_finished()
        assert checkpointer.latest_step() == 1
        restored, extra = checkpointer.restore(abstract_train_state(model, OPTIMIZER))

    assert extra == EXTRA
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert_same_arrays(host(restored), saved)
    stored = to_nested_dict(restored)  # the names on disk: paths, without nnx's ".value"
    np.testing.assert_array_equal(stored["params"]["final_linear"]["kernel"], restored.params["final_linear"]["kernel"])
    assert stored["step"] == 1

    resumed, resumed_metrics = step(restored, batch, empty, empty_mask)
    assert float(resumed_metrics["loss"]) == float(continued_metrics["loss"])
    assert_same_arrays(host(resumed), continued)


def test_keeps_the_last_n_at_the_interval(tmp_path):
    with Checkpointer(tmp_path, keep=2, save_interval_steps=2) as checkpointer:
        started = [checkpointer.save(step, small_state(step), {"step": step}) for step in range(2, 8)]
        assert started == [True, False, True, False, True, False]
        assert checkpointer.save(7, small_state(7), {"step": 7}, force=True)
        assert not checkpointer.save(7, small_state(7), force=True)  # already saved
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [6, 7] and checkpointer.latest_step() == 7
        assert sorted(path.name for path in tmp_path.iterdir()) == ["6", "7"]

        abstract = jax.eval_shape(small_state)
        state, extra = checkpointer.restore(abstract, step=6)
        assert extra == {"step": 6}
        assert_same_arrays(host(state), host(small_state(6)))
        with pytest.raises(FileNotFoundError, match=r"step 4 .* holds steps \[6, 7\]"):
            checkpointer.restore(abstract, step=4)


def test_restore_from_an_empty_folder_says_so(tmp_path):
    with Checkpointer(tmp_path) as checkpointer, pytest.raises(FileNotFoundError, match="holds steps \\[\\]"):
        checkpointer.restore(jax.eval_shape(small_state))


def test_restore_onto_other_meshes(tmp_path):
    run = script("meshes", tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-5000:]
    results = json.loads(stdout.splitlines()[-1])
    assert results["devices"] == 8
    assert results["saved_fraction"] < 0.13  # written from fsdp=8 shards
    for name, fraction, devices in (("data2_fsdp4", 0.26, 8), ("one_device", 1.0, 1)):
        restored = results[name]
        assert restored["same_structure"] and restored["values_equal"] and restored["laid_out_as_requested"]
        assert restored["stored_fraction"] <= fraction and restored["devices"] == devices
        assert restored["extra"] == {"data": {"epoch": 0, "position": 8}}
    assert results["data2_fsdp4"]["stored_fraction"] > 0.25  # a quarter per device, replicated over data


def test_a_save_killed_midway_leaves_the_previous_step(tmp_path):
    child = script("saving", tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert child.stdout.readline().strip() == SAVING_MARKER  # step 2 written whole, held before its rename
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    partial = [path.name for path in tmp_path.iterdir() if path.name.startswith("2")]
    assert partial and "2" not in partial, f"the kill should land while step 2 is a temporary folder: {partial}"

    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() == 1 and checkpointer.all_steps() == [1]
        state, extra = checkpointer.restore(jax.eval_shape(small_state))
        # Orbax removes the partial step in a background thread that the next save waits for.
        assert checkpointer.save(2, small_state(2), force=True)
    assert extra == {}
    assert_same_arrays(host(state), host(small_state()))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["1", "2"]  # the partial step is cleaned away


def test_sigterm_sets_the_flag_and_close_restores_the_handler():
    signals = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(signum))
    try:
        previous = signal.getsignal(signal.SIGTERM)
        with PreemptionWatcher() as watcher:
            assert not watcher.should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            assert watcher.should_stop(1) and watcher.requested
            assert signals == []  # ours replaced the previous handler
        assert signal.getsignal(signal.SIGTERM) is previous
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, original)


def test_a_ctrl_c_sets_the_flag_and_a_second_interrupts():
    previous = signal.getsignal(signal.SIGINT)
    with PreemptionWatcher() as watcher:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: training saves, then stops
        assert watcher.should_stop(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes
    assert signal.getsignal(signal.SIGINT) is previous


def test_processes_agree_on_the_step_to_stop_after_a_sigterm_to_one():
    port = free_port()
    processes = [script("preempted", rank, port, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == READY_MARKER, process.stderr.read()[-3000:]
        processes[1].send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0, 0], outputs[1][1][-3000:]
    stops = [int(stdout) for stdout, _ in outputs]
    assert stops[0] == stops[1] > 0
