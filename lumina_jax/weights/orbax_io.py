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
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# In every folder atomic_folder writes: what --overwrite may replace (never a folder we did not write).
MARKER = ".lumina-jax-output"
MARKER_TEXT = "Written by lumina-jax: --overwrite may replace this folder.\n"


def _in_flight_gb(tree: dict) -> int:
    """Orbax stages arrays in host memory while writing and reading; bounding what is in flight
    (to the largest array, at least 1 GB) keeps a 2B-parameter save near one copy of the weights,
    where unbounded it peaked at two."""
    largest = max(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))
    return max(1, math.ceil(largest / 1e9))


def is_converted(folder: Path) -> bool:
    return (folder / PARAMS_DIR).is_dir() and (folder / CONFIG_FILE).is_file()


def check_destination(
    destination: str | os.PathLike, *, overwrite: bool, keep: Iterable[str | os.PathLike] = ()
) -> None:
    """Raise unless writing `destination` can lose nothing: it must not be, or contain, the working directory
    or any of `keep` (the sources), and may exist only with `overwrite`, as an earlier output of ours (it
    holds MARKER) or an empty folder."""
    destination, resolved = Path(destination), Path(destination).resolve()
    for kept, what in [*((Path(path), "the source") for path in keep), (Path.cwd(), "the working directory")]:
        if resolved == kept.resolve() or resolved in kept.resolve().parents:
            raise FileExistsError(f"{destination} is or contains {what} ({kept}); choose another output")
    if not destination.exists() and not destination.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{destination} already exists; choose another output or pass --overwrite")
    if not destination.is_dir() or not ((destination / MARKER).is_file() or not any(destination.iterdir())):
        raise FileExistsError(
            f"{destination} is not an earlier output of lumina-jax (no {MARKER} in it), so --overwrite leaves it "
            "alone; choose another output, or delete it yourself"
        )


@contextlib.contextmanager
def atomic_folder(
    destination: str | os.PathLike, *, overwrite: bool = False, keep: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it becomes `destination` (marked as ours) only if the block
    succeeds. With `overwrite` it replaces an earlier output of ours (`check_destination`); the old folder
    is renamed aside before the new one is renamed in, and deleted only then."""
    destination = Path(destination)
    check_destination(destination, overwrite=overwrite, keep=keep)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.parent / f".{destination.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        yield partial
        (partial / MARKER).write_text(MARKER_TEXT)
        if destination.exists():
            replaced = destination.parent / f".{destination.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.replace(destination, replaced)
            try:
                os.replace(partial, destination)
            except OSError:
                os.replace(replaced, destination)
                raise
            shutil.rmtree(replaced)
        else:
            os.replace(partial, destination)
    finally:
        if partial.exists():
            shutil.rmtree(partial)


def write_converted(
    destination: str | os.PathLike,
    config: dict,
    params: dict,
    *,
    overwrite: bool = False,
    keep: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write config.json and the Orbax params of one model as `destination`, atomically (`atomic_folder`)."""
    with atomic_folder(destination, overwrite=overwrite, keep=keep) as folder:
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
