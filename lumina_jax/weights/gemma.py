"""Finding, checking and importing the Gemma text encoder's weights.

Layouts: a transformers folder (config.json with model.safetensors, or shards listed by
model.safetensors.index.json), a diffusers pipeline folder (its text_encoder/), or a folder written by
`convert_text_encoder`. Keys are GemmaModel's, or GemmaForCausalLM's under `model.`; the released
Lumina-Next text encoders carry no `lm_head.weight` (the causal LM ties it to the embedding), so it
is refused like any other unknown key.
"""

import re
from pathlib import Path

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lumina_jax import hub
from lumina_jax.models.gemma import GemmaConfig, GemmaEncoder
from lumina_jax.sharding import abstract_module
from lumina_jax.weights import importer
from lumina_jax.weights.importer import LINEAR, Target, UnknownKeyError, resolve_dtype

_STEM = "model"
_CAUSAL_LM_PREFIX = "model."
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(self_attn\.[qkvo]_proj\.(?:weight|bias)|mlp\.(?:gate|up|down)_proj\.weight)")
_LAYER_NORM_KEY = re.compile(r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight")
_LINEAR_LEAF = {"weight": ("kernel", LINEAR), "bias": ("bias", None)}


def gemma_key_to_target(key: str) -> Target:
    """Map a transformers GemmaModel (or GemmaForCausalLM, `model.`-prefixed) key to our parameter."""
    key = key.removeprefix(_CAUSAL_LM_PREFIX)
    if key == "embed_tokens.weight":
        return Target(("embed_tokens", "embedding"))
    if key == "norm.weight":
        return Target(("norm", "weight"))
    if match := _LAYER_KEY.fullmatch(key):
        *module, leaf = match[2].split(".")
        name, permute = _LINEAR_LEAF[leaf]
        return Target(("layers", *module, name), int(match[1]), permute)
    if match := _LAYER_NORM_KEY.fullmatch(key):
        return Target(("layers", match[2], "weight"), int(match[1]))
    raise UnknownKeyError(key)


def gemma_keys(config: GemmaConfig) -> list[str]:
    """Every key of a transformers GemmaModel with this config, for writing that layout back out."""
    projections = [f"self_attn.{p}_proj" for p in "qkvo"]
    leaves = ["weight", "bias"] if config.attention_bias else ["weight"]
    per_layer = [f"{p}.{leaf}" for p in projections for leaf in leaves]
    per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    layers = [f"layers.{i}.{key}" for i in range(config.num_hidden_layers) for key in per_layer]
    return ["embed_tokens.weight", *layers, "norm.weight"]


def find_text_encoder(path: str | Path, *, revision: str | None = None) -> importer.Checkpoint:
    """Recognise the layout at `path` (or of a hub id's files, downloaded at `revision`) and read its config
    and tensor index (no tensor data)."""
    path = hub.local_path(path, "text_encoder", revision=revision)
    return importer.find_component(path, subfolder="text_encoder", stem=_STEM, from_dict=GemmaConfig.from_dict,
                                   model_name="Gemma")  # fmt: skip


def parameter_shapes(config: GemmaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    return importer.parameter_shapes(lambda: GemmaEncoder(config, rngs=nnx.Rngs(0)))


def import_params(checkpoint: importer.Checkpoint, param_dtype, *, progress: bool = True) -> dict:
    """Check every key and shape, then stream the tensors into numpy arrays by parameter path."""
    shapes = parameter_shapes(checkpoint.config)
    plan = importer.plan_import(checkpoint.tensors, gemma_key_to_target, shapes, checkpoint.path, "Gemma")
    return importer.read_params(plan, shapes, param_dtype, checkpoint.path, progress=progress)


def load_text_encoder(
    path: str | Path,
    dtype: str = "float32",
    *,
    param_dtype: str | None = None,
    scan_layers: bool = True,
    mesh: Mesh | None = None,
    progress: bool = True,
    revision: str | None = None,
) -> GemmaEncoder:
    """The Gemma encoder of a transformers, diffusers pipeline or converted folder, or a hub id's (at
    `revision`); `dtype` is the compute dtype and, unless `param_dtype` says otherwise, the parameter dtype.
    Each parameter goes straight into its sharding on `mesh` (default: the current mesh, else one device)."""
    checkpoint = find_text_encoder(path, revision=revision)
    compute, storage = resolve_dtype(dtype), resolve_dtype(param_dtype or dtype)
    abstract = abstract_module(
        lambda: GemmaEncoder(
            checkpoint.config, dtype=compute, param_dtype=storage, scan_layers=scan_layers, rngs=nnx.Rngs(0)
        )
    )
    converted = checkpoint.path if checkpoint.tensors is None else None
    return importer.materialize(
        abstract, converted, lambda: import_params(checkpoint, storage, progress=progress), mesh
    )


def convert_text_encoder(
    source: str | Path, destination: str | Path, *, dtype: str = "float32", overwrite: bool = False,
    progress: bool = True,
) -> Path:  # fmt: skip
    """Convert a transformers or diffusers pipeline Gemma text encoder to our Orbax folder; returns it."""
    return importer.convert_checkpoint(find_text_encoder(source), import_params, destination, dtype=dtype,
                                       overwrite=overwrite, progress=progress)  # fmt: skip


def transformers_state_dict(encoder: GemmaEncoder) -> dict[str, np.ndarray]:
    """Every parameter, the unused last layer and final norm included, under GemmaModel's names and layouts."""
    params = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
    return importer.export_state_dict(params, gemma_keys(encoder.config), gemma_key_to_target)
