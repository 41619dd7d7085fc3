"""Checkpoint runs that need a process of their own; tests/test_checkpoint.py starts them.

python tests/checkpoint_checks.py meshes DIR   (XLA_FLAGS=--xla_force_host_platform_device_count=8)
    saves a training state laid out for fsdp=8, restores it under data=2 x fsdp=4 and onto one
    device; prints the measurements as JSON.
python tests/checkpoint_checks.py saving DIR
    saves step 1 (unless DIR holds it) and waits for it, then saves step 2 asynchronously and holds it at
    its last act, the rename of its written temporary folder: prints SAVING_MARKER there and waits for a
    line on stdin before renaming, then prints SAVED_MARKER. A test kills the process at that moment (every
    byte of step 2 written, nothing committed), or opens DIR beside the held save.
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from sharding_checks import laid_out_as, stored_fraction, tiny_model

from lumina_jax import sharding
from lumina_jax.training.checkpoint import Checkpointer, PreemptionWatcher, abstract_train_state
from lumina_jax.training.step import ClippedAdamW

SAVING_MARKER = "step 2 is written, not yet renamed"
SAVED_MARKER = "step 2 saved"
READY_MARKER = "stepping"
RESTORE_MESHES = {"data2_fsdp4": dict(data=2, fsdp=4), "one_device": None}


def small_state(seed: int = 1) -> dict:
    """The complete step 1 of the saving run: a few arrays of several dtypes."""
    rng = np.random.default_rng(seed)
    return {
        "weights": [jnp.asarray(rng.standard_normal((3, 5), np.float32)), jnp.asarray(rng.standard_normal(7))],
        "count": jnp.asarray(rng.integers(0, 100, (), np.int32)),
    }


def saving(directory: str) -> None:
    checkpointer = Checkpointer(directory)
    checkpointer.save(1, small_state())
    checkpointer.wait_until_finished()
    # Hold step 2 where a kill does the most harm, between its last byte and its rename: the same moment
    # on any machine, where a race with the writing thread would depend on the machine's speed
    rename = os.rename

    def held_rename(source, target, *args, **kwargs):
        if os.path.basename(target) == "2":
            print(SAVING_MARKER, flush=True)
            sys.stdin.readline()
        return rename(source, target, *args, **kwargs)

    os.rename = held_rename
    checkpointer.save(2, small_state(seed=2))
    checkpointer.wait_until_finished()
    print(SAVED_MARKER, flush=True)


def host(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def random_like(abstract, seed: int = 0):
    """Arrays of abstract's structure, shapes, dtypes and shardings, each with its own random values
    (placed from host: nothing to compile), so that no two leaves could be confused."""
    rng = np.random.default_rng(seed)

    def draw(x):
        values = (
            rng.integers(0, 2**31, x.shape) if jnp.issubdtype(x.dtype, jnp.integer) else rng.standard_normal(x.shape)
        )
        return jax.device_put(values.astype(x.dtype), x.sharding)

    return jax.tree.map(draw, abstract)


def meshes(directory: str) -> dict:
    model = tiny_model()
    optimizer = ClippedAdamW()
    fsdp8 = sharding.make_mesh()
    state = random_like(abstract_train_state(model, optimizer, fsdp8))
    saved = host(state)
    results = {"devices": jax.device_count(), "saved_fraction": stored_fraction(state)}
    with Checkpointer(directory) as checkpointer:
        checkpointer.save(1, state, {"data": {"epoch": 0, "position": 8}})
        checkpointer.wait_until_finished()
        for name, axes in RESTORE_MESHES.items():
            abstract = abstract_train_state(model, optimizer, None if axes is None else sharding.make_mesh(**axes))
            restored, extra = checkpointer.restore(abstract)
            restored_values = host(restored)
            results[name] = {
                "extra": extra,
                "same_structure": jax.tree.structure(restored) == jax.tree.structure(state),
                "values_equal": len(saved) == len(restored_values)
                and all(np.array_equal(a, b) for a, b in zip(saved, restored_values)),
                "laid_out_as_requested": laid_out_as(restored, jax.tree.map(lambda x: x.sharding, abstract)),
                "stored_fraction": stored_fraction(restored),
                "devices": len({device for x in jax.tree.leaves(restored) for device in x.devices()}),
            }
    return results


def preempted(process_id: int, port: int) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    with PreemptionWatcher() as watcher:
        print(READY_MARKER, flush=True)
        step = 0
        while not watcher.should_stop(step):
            time.sleep(0.01)  # a training step
            step += 1
    print(step, flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "saving":
        saving(*args)
    elif mode == "preempted":
        preempted(*map(int, args))
    else:
        print(json.dumps(meshes(*args)))
