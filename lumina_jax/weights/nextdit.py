"""Finding, checking and importing Next-DiT weights in every layout users bring.

Layouts: a diffusers transformer folder (config.json, one or sharded safetensors), a diffusers
pipeline folder (its transformer/), an original Lumina-Next checkpoint (consolidated[_ema]
.00-of-01.safetensors or .pth, with model_args.pth), a single checkpoint file, or a folder
written by `python -m convert`. Tensors stream one at a time into preallocated arrays, so the
import holds one copy of the weights.
"""

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lumina_jax import hub
from lumina_jax.models.nextdit import PRESETS, NextDiT, NextDiTConfig
from lumina_jax.weights import importer, orbax_io
from lumina_jax.weights.family import ModelFamily
from lumina_jax.weights.importer import LazyTensor
from lumina_jax.weights.nextdit_keys import (
    diffusers_key_to_target,
    diffusers_keys,
    original_key_to_diffusers,
)
from lumina_jax.weights.safetensors_io import read_safetensors, write_safetensors
from lumina_jax.weights.torch_pickle import load_pth


@dataclasses.dataclass
class NextDiTCheckpoint(importer.Checkpoint):
    """Next-DiT weights found on disk, not yet read, in one of several layouts."""

    layout: str = "diffusers"  # "diffusers", "original" or "converted"


def _read_tensor_file(path: Path) -> Mapping[str, LazyTensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        state = load_pth(path)
        state = state.get("model", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, found a {type(state).__name__}")
        return state
    raise ValueError(f"{path}: unknown checkpoint file type {path.suffix!r}; expected .safetensors or .pth")


def _layout_of(path: Path, tensors: Mapping[str, LazyTensor]) -> str:
    if "patch_embedder.proj.weight" in tensors:
        return "diffusers"
    if "x_embedder.weight" in tensors:
        return "original"
    raise ValueError(
        f"{path}: not a Next-DiT checkpoint (neither 'patch_embedder.proj.weight' of diffusers nor "
        f"'x_embedder.weight' of the original; first keys: {sorted(tensors)[:5]})"
    )


def config_from_original(tensors: Mapping[str, LazyTensor], path: Path) -> NextDiTConfig:
    """Read the architecture off the tensor shapes of an original checkpoint (latents have 4 channels)."""
    try:
        hidden, patch_features = tensors["x_embedder.weight"].shape
        heads = tensors["layers.0.attention.gate"].shape[0]
        kv_width = tensors["layers.0.attention.wk.weight"].shape[0]
        caption_dim = tensors["cap_embedder.0.weight"].shape[0]
        ffn_dim = tensors["layers.0.feed_forward.w1.weight"].shape[0]
        final_features = tensors["final_layer.linear.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{path}: original Next-DiT checkpoint without {e.args[0]!r}") from None
    in_channels = 4
    patch = math.isqrt(patch_features // in_channels)
    layers = 1 + max(int(m[1]) for k in tensors if (m := re.match(r"layers\.(\d+)\.", k)))
    head_dim = hidden // heads
    base = dict(
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_width // head_dim,
        cross_attention_dim=caption_dim,
        learn_sigma=final_features == 2 * patch_features,
        qk_norm="layers.0.attention.q_norm.weight" in tensors,
    )
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        config = NextDiTConfig(multiple_of=multiple_of, **base)
        if config.ffn_dim == ffn_dim:
            return config
    # Trained with ffn_dim_multiplier m: the width is int(m * int(8 * hidden / 3)) rounded up to
    # multiple_of, and m is not in the tensors. Any m giving the same width computes the same model:
    # take the one that lands halfway into the width's last unit, far from int()'s rounding edge.
    config = NextDiTConfig(multiple_of=1, ffn_dim_multiplier=(ffn_dim + 0.5) / int(8 * hidden / 3), **base)
    if config.ffn_dim != ffn_dim:
        raise ValueError(f"{path}: feed-forward width {ffn_dim} matches no FFN configuration for hidden size {hidden}")
    return config


def _original_config(folder: Path, tensors: Mapping[str, LazyTensor], checkpoint: Path) -> NextDiTConfig:
    """The named preset of model_args.pth when there is one, else the shapes; sample size from its image_size."""
    config = config_from_original(tensors, checkpoint)
    args_path = folder / "model_args.pth"
    if args_path.exists():
        args = load_pth(args_path)
        if getattr(args, "model", None) in PRESETS:
            config = PRESETS[args.model]
        if getattr(args, "image_size", None):
            config = dataclasses.replace(config, sample_size=int(args.image_size) // 8)
    return config


def _from_file(path: Path) -> NextDiTCheckpoint:
    """One checkpoint file: original (config from shapes and model_args.pth) or diffusers (config.json beside it)."""
    tensors = _read_tensor_file(path)
    if _layout_of(path, tensors) == "original":
        return NextDiTCheckpoint(path, _original_config(path.parent, tensors, path), tensors, "original")
    if not (path.parent / "config.json").exists():
        raise ValueError(f"{path}: a diffusers checkpoint needs its config.json beside it")
    return _diffusers_checkpoint(path, _read_config(path.parent / "config.json"), tensors)


def _read_config(path: Path) -> NextDiTConfig:
    return importer.read_config(path, NextDiTConfig.from_dict, "Next-DiT")


def _diffusers_checkpoint(path: Path, config: NextDiTConfig, tensors: Mapping[str, LazyTensor]) -> NextDiTCheckpoint:
    """A diffusers checkpoint; its caption branch has a query of its own where, in any layer, attn2's
    query projection or norm differs from attn1's (diffusers keeps both; the released weights' agree)."""

    def differs(layer: int, name: str) -> bool:
        first, second = (tensors.get(f"layers.{layer}.attn{i}.{name}") for i in (1, 2))
        return first is not None and second is not None and not np.array_equal(first.load(), second.load())

    names = ("to_q.weight", "norm_q.weight", "norm_q.bias")
    separate = any(differs(layer, name) for layer in range(config.num_layers) for name in names)
    if separate:
        config = dataclasses.replace(config, separate_caption_query=True)
    return NextDiTCheckpoint(path, config, tensors, "diffusers")


class NextDiTFamily(ModelFamily):
    """Next-DiT: its layouts are found by their files, and the original's keys map through diffusers'."""

    def find(self, path: str | Path, *, ema: bool = False, revision: str | None = None) -> NextDiTCheckpoint:
        """Recognise the layout at `path` (or of a hub id's files, downloaded at `revision`) and read its
        config and tensor index (no tensor data); `ema` picks an original checkpoint's EMA weights."""
        path = hub.local_path(path, self.hub_kind, revision=revision, ema=ema)
        if path.is_file():
            return _from_file(path)
        stem = "consolidated_ema.00-of-01" if ema else "consolidated.00-of-01"
        for suffix in (".safetensors", ".pth"):
            if (path / f"{stem}{suffix}").exists():
                return _from_file(path / f"{stem}{suffix}")
        found = importer.find_component(
            path,
            subfolder=self.subfolder,
            stem=self.stem,
            from_dict=NextDiTConfig.from_dict,
            model_name=self.name,
            other_layouts=f"an original Lumina-Next folder with {stem}.safetensors or .pth",
        )
        if found.tensors is None:
            return NextDiTCheckpoint(found.path, found.config, None, "converted")
        return _diffusers_checkpoint(found.path, found.config, found.tensors)

    def key_map(self, checkpoint: NextDiTCheckpoint):
        """diffusers' keys (attn2's query to its own parameter where the checkpoint has one); the
        original's through their diffusers names."""
        to_target = functools.partial(
            diffusers_key_to_target, separate_caption_query=checkpoint.config.separate_caption_query
        )
        if checkpoint.layout == "original":
            return lambda key: to_target(original_key_to_diffusers(key))
        return to_target

    def load(
        self, path: str | Path, dtype: str = "float32", *, ema: bool = False, revision: str | None = None, **options
    ) -> NextDiT:
        """A Next-DiT with weights from any supported layout, or a hub id's (at `revision`); `ema` picks the
        EMA weights of an original checkpoint. `options`: param_dtype, mesh, progress (as `build`), and
        the model's scan_layers, remat and attention_backend."""
        return self.build(self.find(path, ema=ema, revision=revision), dtype, **options)


NEXT_DIT = NextDiTFamily(
    name="Next-DiT",
    model=NextDiT,
    config=NextDiTConfig,
    key_to_target=diffusers_key_to_target,
    subfolder="transformer",
    stem="diffusion_pytorch_model",
    hub_kind="transformer",
)
find_checkpoint = NEXT_DIT.find
parameter_shapes = NEXT_DIT.parameter_shapes
plan_import = NEXT_DIT.plan
import_params = NEXT_DIT.import_params
build_model = NEXT_DIT.build
load_transformer = NEXT_DIT.load
convert_transformer = NEXT_DIT.convert


def diffusers_state_dict(model: NextDiT) -> dict[str, np.ndarray]:
    """Our parameters under diffusers' names and layouts; a shared query is written twice, as diffusers stores it."""
    to_target = functools.partial(diffusers_key_to_target, separate_caption_query=model.config.separate_caption_query)
    return NEXT_DIT.export_state_dict(model, diffusers_keys(model.config.num_layers), to_target)


def save_diffusers(model: NextDiT, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write a diffusers transformer folder that `LuminaNextDiT2DModel.from_pretrained` loads."""
    with orbax_io.atomic_folder(folder, overwrite=overwrite) as partial:
        orbax_io.write_config(partial, model.config.to_dict())
        write_safetensors(partial / "diffusion_pytorch_model.safetensors", diffusers_state_dict(model))
    return Path(folder)
