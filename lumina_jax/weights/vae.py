"""Finding, checking and importing autoencoder weights: diffusers' AutoencoderKL (the SDXL VAE of Lumina-Next and
Lumina-T2I, the FLUX VAE of Lumina-Image 2.0), the one registered autoencoder family (`AUTOENCODERS`).

Layouts: a diffusers vae folder (config.json, one or sharded safetensors), a diffusers pipeline
folder (its vae/), or a folder written by `convert_vae` (config.json and an Orbax params/).
Tensors stream one at a time into preallocated arrays, through the shared strict importer.
"""

import re
from pathlib import Path

from lumina_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from lumina_jax.weights.family import ModelFamily, registered_family, registered_model
from lumina_jax.weights.importer import CONV, LINEAR, Target, UnknownKeyError

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


VAE = ModelFamily(
    name="AutoencoderKL",
    model=AutoencoderKL,
    config=AutoencoderKLConfig,
    key_to_target=vae_key_to_target,
    subfolder="vae",
    stem=WEIGHTS_STEM,
    hub_kind="vae",
)
find_vae = VAE.find
parameter_shapes = VAE.parameter_shapes
import_params = VAE.import_params
load_vae = VAE.load  # (path, dtype, *, param_dtype=, mesh=, revision=)
convert_vae = VAE.convert

# The autoencoder families, by config.json's _class_name: a new family registers here.
AUTOENCODERS: dict[str, ModelFamily] = {"AutoencoderKL": VAE}


def autoencoder_family(folder: Path) -> ModelFamily:
    """The family of the autoencoder in `folder` (a model folder, or a pipeline's vae/): its config.json's
    _class_name; AutoencoderKL where there is none."""
    return registered_family(folder, AUTOENCODERS, "_class_name", "AutoencoderKL", "autoencoder")


def autoencoder_model(config) -> type:
    """The model class of an autoencoder's config (an `AutoencoderKLConfig` builds an `AutoencoderKL`)."""
    return registered_model(config, AUTOENCODERS, "autoencoder")
