"""Our on-disk format: a folder with config.json and an Orbax checkpoint of the parameters.

Folders are written under a temporary name and renamed into place when complete, so a killed
conversion never leaves a folder that later loads as if whole.
"""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


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


def write_config(folder: Path, config: dict) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def save_params(folder: Path, params: dict) -> None:
    """Save a nested dict of arrays (numpy or jax) as folder/params."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((folder / PARAMS_DIR).absolute(), params)


def restore_params(folder: Path, abstract: dict) -> dict:
    """Restore folder/params into the shapes, dtypes and shardings of `abstract` (ShapeDtypeStructs).

    Leaves without a sharding land on the default device; give NamedShardings for a sharded restore.
    Dtypes are cast on read, so a float32 conversion loads as bfloat16 and back.
    """
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None) or device),
        abstract,
    )
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore((folder / PARAMS_DIR).absolute(), target)
