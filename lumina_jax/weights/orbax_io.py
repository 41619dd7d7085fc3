"""Our on-disk format: a folder with config.json and an Orbax checkpoint of the parameters.

Folders are written under a temporary name and renamed into place when complete, so a killed
conversion never leaves a folder that later loads as if whole. In a bucket (gs://...), where nothing
renames atomically, a folder is written locally and uploaded with its top-level files last (see `_publish`).
"""

import contextlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from lumina_jax.buckets import files_under, is_remote

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


def _resolved(path: str | os.PathLike) -> epath.Path | Path:
    """A local path with its symlinks resolved (epath's resolve keeps them), a URL as it is."""
    return epath.Path(path) if is_remote(path) else Path(path).resolve()


def is_converted(folder: Path) -> bool:
    return (folder / PARAMS_DIR).is_dir() and (folder / CONFIG_FILE).is_file()


def check_destination(
    destination: str | os.PathLike, *, overwrite: bool, keep: Iterable[str | os.PathLike] = ()
) -> None:
    """Raise unless writing `destination` can lose nothing: it must not be, or contain, the working directory
    or any of `keep` (the sources), and may exist only with `overwrite`, as an earlier output of ours (it
    holds MARKER) or an empty folder."""
    destination = epath.Path(destination)
    resolved = _resolved(destination)
    for kept, what in [*((path, "the source") for path in keep), (Path.cwd(), "the working directory")]:
        if resolved == _resolved(kept) or resolved in _resolved(kept).parents:
            raise FileExistsError(f"{destination} is or contains {what} ({kept}); choose another output")
    if not (destination.exists() if is_remote(destination) else os.path.lexists(destination)):
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
    is renamed aside before the new one is renamed in, and deleted only then. A destination in a bucket is
    filled in a local temporary folder and uploaded (`_publish`)."""
    check_destination(destination, overwrite=overwrite, keep=keep)
    if is_remote(destination):
        with tempfile.TemporaryDirectory(prefix="lumina-jax-") as local:
            yield Path(local)
            (Path(local) / MARKER).write_text(MARKER_TEXT)
            _publish(Path(local), epath.Path(destination))
        return
    destination = Path(destination)
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


def _publish(local: Path, destination: epath.Path) -> None:
    """Upload the finished folder `local` as `destination` in a bucket. Each object appears whole or not at all,
    but a folder cannot: an earlier output there (ours: `check_destination`) is emptied, its top-level files
    first and its marker kept, then the new files go up, the marker first and the top-level files last. A
    loader opens a top-level file first (a pipeline's model_index.json, our config.json), so an upload cut
    short leaves a folder that does not load, and that --overwrite may replace."""
    for file in sorted(files_under(destination), key=lambda file: file.parent != destination):  # top-level first
        if file != destination / MARKER:
            file.unlink()
    new = [file for file in local.rglob("*") if file.is_file()]
    for file in sorted(new, key=lambda file: (file.name != MARKER, file.parent == local)):
        _upload(file, destination / file.relative_to(local))


def _upload(file: Path, target: epath.Path) -> None:
    with file.open("rb") as source, target.open("wb") as uploading:
        shutil.copyfileobj(source, uploading, 64 << 20)


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
