"""Finding, checking and importing AutoencoderKL weights (the SDXL VAE of Lumina-Next).

Layouts: a diffusers vae folder (config.json, one or sharded safetensors), a diffusers pipeline
folder (its vae/), or a folder written by `convert_vae` (config.json and an Orbax params/).
Tensors stream one at a time into preallocated arrays, through the shared strict importer.
"""

import functools
import re
import types
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from lumina_jax import hub
from lumina_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from lumina_jax.sharding import abstract_module
from lumina_jax.weights import importer
from lumina_jax.weights.importer import CONV, LINEAR, Target, UnknownKeyError, resolve_dtype

WEIGHTS_STEM = "diffusion_pytorch_model"
# Checkpoints saved before diffusers' attention refactor name the mid-block attention's projections
# so; diffusers renames them on load (ModelMixin._convert_deprecated_attention_blocks), and so do we.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_RESNET = r"resnets\.\d+\.(?:norm1|norm2|conv1|conv2|conv_shortcut)"
_ATTENTION = rf"attentions\.0\.(?:group_norm|to_q|to_k|to_v|to_out\.0|{'|'.join(_DEPRECATED_ATTENTION)})"
_SHARED = rf"conv_in|conv_out|conv_norm_out|mid_block\.(?:{_RESNET}|{_ATTENTION})"
_KEY = re.compile(
    rf"(?P<module>quant_conv|post_quant_conv"
    rf"|encoder\.(?:{_SHARED}|down_blocks\.\d+\.(?:{_RESNET}|downsamplers\.0\.conv))"
    rf"|decoder\.(?:{_SHARED}|up_blocks\.\d+\.(?:{_RESNET}|upsamplers\.0\.conv)))"
    r"\.(?P<kind>weight|bias)"
)
# diffusers' single-entry module lists, folded into one module each in our model
_FOLDED = {
    "downsamplers.0": "downsample",
    "upsamplers.0": "upsample",
    "attentions.0": "attention",
    "to_out.0": "to_out",
}


def vae_key_to_target(key: str) -> Target:
    """Where a diffusers AutoencoderKL state-dict tensor lands in our model; UnknownKeyError otherwise."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise UnknownKeyError(key)
    parent, _, leaf = match["module"].rpartition(".")
    module = f"{parent}.{_DEPRECATED_ATTENTION.get(leaf, leaf)}" if parent else leaf
    for old, new in _FOLDED.items():
        module = module.replace(old, new)
    path = tuple(int(part) if part.isdigit() else part for part in module.split("."))
    if "norm" in path[-1]:
        return Target(path + ("scale" if match["kind"] == "weight" else "bias",))
    if match["kind"] == "bias":
        return Target(path + ("bias",))
    return Target(path + ("kernel",), permute=LINEAR if path[-1].startswith("to_") else CONV)


def find_vae(path: str | Path, *, revision: str | None = None) -> importer.Checkpoint:
    """Recognise the layout at `path` (or of a hub id's files, downloaded at `revision`) and read its config
    and tensor index (no tensor data)."""
    path = hub.local_path(path, "vae", revision=revision)
    return importer.find_component(path, subfolder="vae", stem=WEIGHTS_STEM, from_dict=AutoencoderKLConfig.from_dict,
                                   model_name="AutoencoderKL")  # fmt: skip


@functools.cache
def parameter_shapes(config: AutoencoderKLConfig) -> Mapping[tuple, tuple[int, ...]]:
    """Cached: tracing the VAE's hundreds of parameter initialisers takes seconds (flax reads each traced
    RNG counter's `sharding`, and the failed read formats an error message that scans the whole trace)."""
    return types.MappingProxyType(importer.parameter_shapes(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0))))


def import_params(checkpoint: importer.Checkpoint, param_dtype=jnp.float32, *, progress: bool = True) -> dict:
    """Check every key and shape of a diffusers checkpoint, then stream it into arrays by parameter path."""
    shapes = parameter_shapes(checkpoint.config)
    plan = importer.plan_import(checkpoint.tensors, vae_key_to_target, shapes, checkpoint.path, "AutoencoderKL")
    return importer.read_params(plan, shapes, param_dtype, checkpoint.path, progress=progress)


def load_vae(
    path: str | Path,
    dtype: str = "float32",
    *,
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    revision: str | None = None,
) -> AutoencoderKL:
    """An AutoencoderKL with weights from a diffusers vae or pipeline folder, or a converted folder, or a hub
    id's (at `revision`); `dtype` is the compute dtype and, unless `param_dtype` says otherwise, the parameter
    dtype. Each parameter goes straight into its sharding on `mesh` (default: the current mesh, else one device)."""
    checkpoint = find_vae(path, revision=revision)
    compute, storage = resolve_dtype(dtype), resolve_dtype(param_dtype or dtype)
    abstract = abstract_module(
        lambda: AutoencoderKL(checkpoint.config, dtype=compute, param_dtype=storage, rngs=nnx.Rngs(0))
    )
    converted = checkpoint.path if checkpoint.tensors is None else None
    return importer.materialize(
        abstract, converted, lambda: import_params(checkpoint, storage, progress=progress), mesh
    )


def convert_vae(
    source: str | Path, destination: str | Path, *, dtype: str = "float32", overwrite: bool = False,
    progress: bool = True,
) -> Path:  # fmt: skip
    """Convert a diffusers VAE to our format (config.json and Orbax params/), written atomically."""
    return importer.convert_checkpoint(find_vae(source), import_params, destination, dtype=dtype, overwrite=overwrite,
                                       progress=progress)  # fmt: skip
