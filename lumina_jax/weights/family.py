"""A model family we import (Next-DiT, Gemma, the VAE) described once, and the one way every family
is found, loaded and converted.

A family says what it is (model and config classes, name), where its files are (a pipeline's
subfolder, the weights' file stem) and how its keys map (a pure function to a `Target`). Loading
finds the checkpoint (a folder in any layout the family knows, or a hub id), plans every key from
the checkpoint's index, builds the model abstractly and streams each tensor straight into its place
on the mesh (`importer.materialize`); converting writes our Orbax format. A family whose files come
in several layouts (Next-DiT) overrides `find` and `key_map`.
"""

import dataclasses
import functools
import json
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lumina_jax import hub
from lumina_jax.sharding import abstract_module
from lumina_jax.weights import importer
from lumina_jax.weights.importer import Checkpoint, Target, resolve_dtype


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str  # in messages: "Gemma"
    model: type[nnx.Module]  # model(config, dtype=, param_dtype=, rngs=, **options)
    config: Any  # the config class, with from_dict
    key_to_target: Callable[[str], Target]
    subfolder: str  # its folder in a diffusers pipeline
    stem: str  # its weights file: stem.safetensors, or shards listed by stem.safetensors.index.json
    hub_kind: hub.Kind
    other_layouts: str | None = None  # for the message when nothing is found

    def find(self, path: str | Path, *, revision: str | None = None) -> Checkpoint:
        """Recognise the layout at `path` (or of a hub id's files, downloaded at `revision`) and read
        its config and tensor index (no tensor data)."""
        path = hub.local_path(path, self.hub_kind, revision=revision)
        return importer.find_component(
            path,
            subfolder=self.subfolder,
            stem=self.stem,
            from_dict=self.config.from_dict,
            model_name=self.name,
            other_layouts=self.other_layouts,
        )

    def model_for(self, config) -> type[nnx.Module]:
        """The model class of a config (one, but for a family of several models)."""
        return self.model

    def key_map(self, checkpoint: Checkpoint) -> Callable[[str], Target]:
        """Where each of this checkpoint's keys goes."""
        return self.key_to_target

    def parameter_shapes(self, config) -> Mapping[tuple[str, ...], tuple[int, ...]]:
        return _parameter_shapes(self.model_for(config), config)

    def plan(self, checkpoint: Checkpoint) -> importer.Plan:
        """Match every tensor of the checkpoint to its parameter, from names and shapes alone."""
        shapes = self.parameter_shapes(checkpoint.config)
        return importer.plan_import(checkpoint.tensors, self.key_map(checkpoint), shapes, checkpoint.path, self.name)

    def import_params(
        self, checkpoint: Checkpoint, param_dtype=jnp.float32, *, progress: bool = True
    ) -> dict[tuple[str, ...], np.ndarray]:
        """Check every key and shape, then stream the tensors into numpy arrays by parameter path."""
        shapes = self.parameter_shapes(checkpoint.config)
        return importer.read_params(self.plan(checkpoint), shapes, param_dtype, checkpoint.path, progress=progress)

    def build(
        self,
        checkpoint: Checkpoint,
        dtype: str = "float32",
        *,
        param_dtype: str | None = None,
        mesh: Mesh | None = None,
        progress: bool = True,
        **options,
    ) -> nnx.Module:
        """The model of a found checkpoint, `dtype` its compute dtype and, unless `param_dtype` says
        otherwise, its parameter dtype; `options` go to the model. Each parameter goes straight into
        its sharding on `mesh` (default: the current mesh, else one device)."""
        compute, storage = resolve_dtype(dtype), resolve_dtype(param_dtype or dtype)
        abstract = abstract_module(
            lambda: self.model_for(checkpoint.config)(
                checkpoint.config, dtype=compute, param_dtype=storage, rngs=nnx.Rngs(0), **options
            )
        )
        converted = checkpoint.path if checkpoint.tensors is None else None
        read = lambda: self.import_params(checkpoint, storage, progress=progress)  # noqa: E731
        return importer.materialize(abstract, converted, read, mesh)

    def load(self, path: str | Path, dtype: str = "float32", *, revision: str | None = None, **options) -> nnx.Module:
        """The model at `path` (any layout of the family, or a hub id's files at `revision`); `options`
        as `build` takes them."""
        return self.build(self.find(path, revision=revision), dtype, **options)

    def convert(
        self,
        source: str | Path,
        destination: str | Path,
        *,
        dtype: str = "float32",
        overwrite: bool = False,
        progress: bool = True,
        revision: str | None = None,
        **find_options,
    ) -> Path:
        """Write the weights at `source` in our format (config.json and Orbax params/), atomically."""
        checkpoint = self.find(source, revision=revision, **find_options)
        return importer.convert_checkpoint(
            checkpoint, self.import_params, destination, dtype=dtype, overwrite=overwrite, progress=progress
        )

    def export_state_dict(self, model: nnx.Module, keys: list[str], to_target=None) -> dict[str, np.ndarray]:
        """The model's parameters under the checkpoint's `keys`, in PyTorch's layouts."""
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return importer.export_state_dict(params, keys, to_target or self.key_to_target)


@functools.cache
def _parameter_shapes(model: type[nnx.Module], config) -> Mapping[tuple[str, ...], tuple[int, ...]]:
    """Cached: tracing a model's parameter initialisers takes seconds for the VAE's hundreds."""
    return types.MappingProxyType(importer.parameter_shapes(lambda: model(config, rngs=nnx.Rngs(0))))


def registered_family(
    folder: Path, families: Mapping[str, ModelFamily], field: str, default: str, kind: str
) -> ModelFamily:
    """The family of the `kind` ("text encoder") in `folder`, by its config.json's `field` (`default` where the
    field or the file is missing), from a registry `families` of field values."""
    config = folder / "config.json"
    try:
        value = json.loads(config.read_text()).get(field, default) if config.is_file() else default
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{config}: not a supported {kind} config: {e}") from None
    if value not in families:
        supported = ", ".join(f"{name!r} ({family.name})" for name, family in families.items())
        raise ValueError(f"{config}: {kind} {field} {value!r} is not supported; lumina-jax runs {supported}")
    return families[value]


def registered_model(config, families: Mapping[str, ModelFamily], kind: str) -> type[nnx.Module]:
    """The model class a config of one of the registered `families` builds."""
    models = {family.config: family.model for family in families.values()}
    if type(config) not in models:
        raise ValueError(f"{type(config).__name__} is no {kind}'s config; lumina-jax runs {', '.join(families)}")
    return models[type(config)]
