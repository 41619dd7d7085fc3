"""Strict, streaming import of PyTorch state dicts into our parameter trees, for every model.

A model's key map is a pure function from a checkpoint key to a `Target`. Planning checks every key
and shape from the checkpoint's index alone, and fails with the full list of unknown keys, missing
parameters and shape mismatches; reading then streams one tensor at a time into preallocated
arrays. Stacked layers live under a top-level entry ("layers"; a model may have several stacks, as
Lumina-Image 2.0's refiners), indexed by `Target.layer`.
"""

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from tqdm.auto import tqdm

from lumina_jax.sharding import abstract_module, parameter_shardings
from lumina_jax.weights import orbax_io
from lumina_jax.weights.safetensors_io import read_safetensors_folder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LINEAR = (1, 0)  # torch Linear [out, in] -> our kernel [in, out]
CONV = (2, 3, 1, 0)  # torch Conv2d [out, in, kh, kw] -> our kernel [kh, kw, in, out]


class UnknownKeyError(KeyError):
    pass


@dataclasses.dataclass(frozen=True)
class Target:
    path: tuple[str, ...]  # parameter path in our model's state
    layer: int | None = None  # index on the stacked layer axis, for per-layer tensors
    permute: tuple[int, ...] | None = None  # axes of the torch tensor, in our order


# A module of a family's diffusers layout, with the rows of a fused tensor it takes (None: all): where a LoRA
# file's module name lands.
LoraModule = tuple[str, slice | None]


def diffusers_module_name(
    name: str, to_target: Callable[[str], Target], original_to_diffusers: Callable[[str], str]
) -> str:
    """A module's diffusers name: itself where diffusers has it, else the original code's name translated;
    UnknownKeyError for neither."""
    try:
        to_target(name + ".weight")
        return name
    except UnknownKeyError:
        return original_to_diffusers(name + ".weight").removesuffix(".weight")


class LazyTensor(Protocol):
    shape: tuple[int, ...]
    dtype: np.dtype

    def load(self) -> np.ndarray: ...


Plan = list[tuple[str, LazyTensor, Target]]


@dataclasses.dataclass
class Checkpoint:
    """A model's weights found on disk, not yet read."""

    path: Path  # what to name in messages
    config: Any
    tensors: Mapping[str, LazyTensor] | None  # None for a folder we converted (Orbax)


def read_config(path: Path, from_dict: Callable[[dict], Any], model_name: str) -> Any:
    try:
        return from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a supported {model_name} config: {e}") from None


def has_vae(pipeline: Path) -> bool:
    """Whether a pipeline folder has a VAE: all do unless model_index.json names none (pixel space)."""
    index = Path(pipeline) / "model_index.json"
    if not index.exists():
        return True
    return json.loads(index.read_text()).get("vae") not in (None, [None, None])


def find_component(
    path: str | Path,
    *,
    subfolder: str,
    stem: str,
    from_dict: Callable[[dict], Any],
    model_name: str,
    other_layouts: str | None = None,
) -> Checkpoint:
    """One model's folder: config.json with `stem`.safetensors (or shards and their index), a diffusers
    pipeline folder (its `subfolder`/), or a folder we converted (config.json and Orbax params/)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise ValueError(
            f"{path}: expected a folder ({model_name} weights, a diffusers pipeline or a converted folder)"
        )
    if (path / "model_index.json").exists():
        if not (path / subfolder).is_dir():
            raise ValueError(f"{path}: a diffusers pipeline folder without {subfolder}/")
        return find_component(
            path / subfolder,
            subfolder=subfolder,
            stem=stem,
            from_dict=from_dict,
            model_name=model_name,
            other_layouts=other_layouts,
        )
    if not (path / "config.json").exists():
        raise ValueError(
            f"{path}: no {model_name} weights found (no config.json). Expected config.json with {stem}.safetensors, "
            f"a diffusers pipeline folder with {subfolder}/, {other_layouts + ', ' if other_layouts else ''}"
            "or a folder written by `python -m convert`"
        )
    config = read_config(path / "config.json", from_dict, model_name)
    if orbax_io.is_converted(path):
        return Checkpoint(path, config, None)
    if not any((path / f"{stem}{suffix}").exists() for suffix in (".safetensors", ".safetensors.index.json")):
        raise ValueError(f"{path}: config.json but no {stem}.safetensors (or {stem}.safetensors.index.json) beside it")
    return Checkpoint(path, config, read_safetensors_folder(path, stem))


def convert_checkpoint(
    checkpoint: Checkpoint,
    import_params: Callable,
    destination: str | Path,
    *,
    dtype: str,
    overwrite: bool,
    progress: bool,
) -> Path:
    """Import a PyTorch checkpoint and write it in our format (config.json, Orbax params/), atomically."""
    if checkpoint.tensors is None:
        raise ValueError(f"{checkpoint.path} is already in our format; load it directly")
    orbax_io.check_destination(destination, overwrite=overwrite, keep=(checkpoint.path,))  # before the reading
    # Orbax copies numpy leaves while saving but not device arrays: hand it device arrays.
    params = to_device(import_params(checkpoint, resolve_dtype(dtype), progress=progress))
    return orbax_io.write_converted(
        destination, checkpoint.config.to_dict(), params, overwrite=overwrite, keep=(checkpoint.path,)
    )


def resolve_dtype(dtype: str | Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def parameter_shapes(make_model: Callable[[], nnx.Module]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter's path and shape, computed abstractly (nothing is allocated)."""
    model = abstract_module(make_model)
    return {path: leaf.shape for path, leaf in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def _source_shape(shape: tuple[int, ...], target: Target) -> tuple[int, ...]:
    """The torch shape that lands as `shape` after the target's permutation."""
    if target.permute is None:
        return tuple(shape)
    return tuple(shape[target.permute.index(axis)] for axis in range(len(shape)))


def plan_import(
    tensors: Mapping[str, LazyTensor],
    to_target: Callable[[str], Target],
    shapes: dict[tuple[str, ...], tuple[int, ...]],
    source: Path,
    model_name: str,
) -> Plan:
    """Match every tensor to its parameter from names and shapes alone; fail listing every problem."""
    plan, unknown, mis_shaped = [], [], []
    for key, tensor in tensors.items():
        try:
            target = to_target(key)
        except UnknownKeyError:
            unknown.append(key)
            continue
        shape = shapes.get(target.path)
        if shape is None or (target.layer is not None and not 0 <= target.layer < shape[0]):
            unknown.append(key)
            continue
        expected = _source_shape(shape[1:] if target.layer is not None else shape, target)
        if tuple(tensor.shape) != expected:
            mis_shaped.append(f"{key} {tuple(tensor.shape)} (expected {expected})")
        plan.append((key, tensor, target))
    covered = {(t.path, t.layer) for _, _, t in plan}
    stacks = {"layers"} | {t.path[0] for _, _, t in plan if t.layer is not None}
    missing = [
        ".".join(path) + ("" if layer is None else f" (layer {layer})")
        for path, shape in shapes.items()
        for layer in (range(shape[0]) if path[0] in stacks else [None])
        if (path, layer) not in covered
    ]
    problems = {"unknown keys": sorted(unknown), "missing parameters": missing, "shape mismatches": mis_shaped}
    lines = [
        f"{title} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
        for title, items in problems.items()
        if items
    ]
    if lines:
        raise ValueError(f"{source}: weights do not match the {model_name} config:\n  " + "\n  ".join(lines))
    return plan


def read_params(
    plan: Plan, shapes: dict[tuple[str, ...], tuple[int, ...]], dtype, source: Path, *, progress: bool = True
) -> dict[tuple[str, ...], np.ndarray]:
    """Stream the planned tensors, one at a time, cast to `dtype`, into preallocated arrays by path.

    Two keys filling one parameter (diffusers stores Next-DiT's shared query twice) must agree.
    """
    dtype = np.dtype(dtype)
    arrays = {path: np.empty(shape, dtype) for path, shape in shapes.items()}
    written: dict[tuple, str] = {}
    for key, tensor, target in tqdm(plan, desc=f"reading {source.name}", disable=not progress, unit="tensor"):
        value = tensor.load()
        value = value if target.permute is None else value.transpose(target.permute)
        destination = arrays[target.path] if target.layer is None else arrays[target.path][target.layer]
        slot = (target.path, target.layer)
        if slot in written:
            if not np.array_equal(destination, value.astype(dtype)):
                raise ValueError(f"{source}: {key} differs from {written[slot]}, which fills the same parameter")
            continue
        np.copyto(destination, value, casting="unsafe")  # one pass: permute and cast into place
        written[slot] = key
    return arrays


def to_device(arrays: dict[tuple[str, ...], np.ndarray], placements: dict[tuple[str, ...], Any] | None = None) -> dict:
    """Move host arrays to their devices one at a time, emptying `arrays`, so that host and devices
    never hold two full copies; returns the nested parameter dict. Each array goes to its sharding
    in `placements` (each device receives only its shard), by default to this process's first device."""
    first = SingleDeviceSharding(jax.local_devices()[0])
    placements = placements or {}
    return unflatten({path: jax.device_put(arrays.pop(path), placements.get(path, first)) for path in list(arrays)})


def parameter_placements(abstract: nnx.Module, mesh: Mesh | None = None) -> dict[tuple[str, ...], Any]:
    """Where each parameter of a module lives, by path: its sharding on `mesh` (default: JAX's current
    mesh, `jax.set_mesh`) by the sharding rules, or with no mesh this process's first device."""
    params = nnx.state(abstract, nnx.Param)
    mesh = jax.sharding.get_mesh() if mesh is None else mesh
    if mesh.empty:
        first = SingleDeviceSharding(jax.local_devices()[0])
        return {path: first for path in flatten(nnx.to_pure_dict(params))}
    return flatten(nnx.to_pure_dict(parameter_shardings(params, mesh)))


def materialize(
    abstract: nnx.Module,
    converted: Path | None,
    read_arrays: Callable[[], dict[tuple[str, ...], np.ndarray]],
    mesh: Mesh | None = None,
) -> nnx.Module:
    """Fill an abstract module (`nnx.eval_shape`): from our Orbax folder `converted`, or else by
    streaming a checkpoint through `read_arrays`. Each parameter goes straight into its place on
    `mesh` (`parameter_placements`): no device ever holds more than its share."""
    graphdef, state = nnx.split(abstract)
    placements = parameter_placements(abstract, mesh)
    if converted is not None:
        shapes = flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
        target = {
            path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placements[path])
            for path, leaf in shapes.items()
        }
        params = orbax_io.restore_params(converted, unflatten(target))
    else:
        params = to_device(read_arrays(), placements)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def export_state_dict(params: dict, keys: list[str], to_target: Callable[[str], Target]) -> dict[str, np.ndarray]:
    """The inverse of an import: each key's tensor in the PyTorch layout, for keys whose parameter exists."""
    flat = flatten(params)
    state = {}
    for key in keys:
        target = to_target(key)
        if target.path in flat:
            value = np.asarray(flat[target.path])
            value = value if target.layer is None else value[target.layer]
            value = value if target.permute is None else value.transpose(np.argsort(target.permute))
            state[key] = np.ascontiguousarray(value)
    return state
