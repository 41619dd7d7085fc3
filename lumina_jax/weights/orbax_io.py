"""Our on-disk format: a folder with config.json and an Orbax checkpoint of the parameters.

Folders are written under a temporary name and renamed into place when complete, so a killed
conversion never leaves a folder that later loads as if whole.
"""

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def _in_flight_gb(tree: dict) -> int:
    """Orbax stages arrays in host memory while writing and reading; bounding what is in flight
    (to the largest array, at least 1 GB) keeps a 2B-parameter save near one copy of the weights,
    where unbounded it peaked at two."""
    largest = max(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))
    return max(1, math.ceil(largest / 1e9))


def is_converted(folder: Path) -> bool:
    return (folder / PARAMS_DIR).is_dir() and (folder / CONFIG_FILE).is_file()


@contextlib.contextmanager
def atomic_folder(destination: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it becomes `destination` only if the block succeeds."""
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists; choose another output or pass --overwrite")
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.parent / f".{destination.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        yield partial
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(partial, destination)
    finally:
        if partial.exists():
            shutil.rmtree(partial)


def write_converted(destination: str | os.PathLike, config: dict, params: dict, *, overwrite: bool = False) -> Path:
    """Write config.json and the Orbax params of one model as `destination`, atomically."""
    with atomic_folder(destination, overwrite=overwrite) as folder:
        write_config(folder, config)
        save_params(folder, params)
    return Path(destination)


def write_config(folder: Path, config: dict) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def save_params(folder: Path, params: dict) -> None:
    """Save a nested dict of arrays as folder/params (give device arrays: Orbax copies numpy ones)."""
    limit = _in_flight_gb(params)
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=limit, save_device_host_concurrent_gb=limit)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save((folder / PARAMS_DIR).absolute(), args=ocp.args.PyTreeSave(params))


def restore_params(folder: Path, abstract: dict) -> dict:
    """Restore folder/params into the shapes, dtypes and shardings of `abstract` (ShapeDtypeStructs).

    Leaves without a sharding land on this process's first device; give NamedShardings for a sharded
    restore (each device reads only its shard). Dtypes are cast on read, so a float32 conversion loads
    as bfloat16 and back.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None) or device),
        abstract,
    )
    handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=_in_flight_gb(abstract))
    with ocp.Checkpointer(handler) as checkpointer:
        return checkpointer.restore((folder / PARAMS_DIR).absolute(), args=ocp.args.StandardRestore(target))
