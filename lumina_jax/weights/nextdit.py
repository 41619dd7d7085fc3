"""Finding, checking and importing diffusion transformer weights in every layout users bring: Next-DiT
(Lumina-Next), Flag-DiT (Lumina-T2I) and Unified Next-DiT (Lumina-Image 2.0), which a checkpoint's keys or
config tell apart.

Layouts: a diffusers transformer folder (config.json, one or sharded safetensors; Next-DiT only), a
diffusers pipeline folder (its transformer/), an original Lumina-Next or Lumina-T2I checkpoint
(consolidated[_ema].00-of-01.safetensors or .pth, with model_args.pth), a single checkpoint file, or a
folder written by `python -m convert`. Tensors stream one at a time into preallocated arrays, so the
import holds one copy of the weights.
"""

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flax import nnx

from lumina_jax import hub
from lumina_jax.models import flagdit, lumina2
from lumina_jax.models.family import TransformerConfig
from lumina_jax.models.flagdit import FlagDiT, FlagDiTConfig
from lumina_jax.models.layers import ffn_fields
from lumina_jax.models.lumina2 import ORIGINAL_QK_NORM_EPS, UnifiedNextDiT, UnifiedNextDiTConfig
from lumina_jax.models.nextdit import PRESETS, NextDiT, NextDiTConfig
from lumina_jax.weights import importer, lumina2_keys, nextdit_keys, orbax_io
from lumina_jax.weights.family import ModelFamily
from lumina_jax.weights.flagdit_keys import original_key_to_target as flagdit_key_to_target
from lumina_jax.weights.importer import LazyTensor, LoraModule, Target
from lumina_jax.weights.lumina2_keys import ORIGINAL_PREFIX, original_tensors
from lumina_jax.weights.safetensors_io import read_safetensors, write_safetensors
from lumina_jax.weights.torch_pickle import load_pth


@dataclasses.dataclass
class TransformerCheckpoint:
    """Transformer weights found on disk, not yet read, in one of several layouts (an `importer.Checkpoint`
    whose config may be decided on first use); its config's class (a key of `ARCHITECTURES`) says the family."""

    path: Path  # what to name in messages
    found_config: TransformerConfig  # as its files say (read without tensor data), or as given
    tensors: Mapping[str, LazyTensor] | None  # None for a folder we converted (Orbax)
    layout: str = "diffusers"  # "diffusers", "original" or "converted"
    caption_query_undecided: bool = False  # diffusers' files: config.json does not say whether attn2 has its own

    @functools.cached_property
    def config(self) -> TransformerConfig:
        """The model's config. Where undecided, the caption branch has a query of its own if, in any layer,
        attn2's query projection or norm differs from attn1's (diffusers keeps both; the released weights'
        agree): deciding reads those tensors, once per checkpoint, on first use."""
        if not self.caption_query_undecided:
            return self.found_config

        def differs(layer: int, name: str) -> bool:
            first, second = (self.tensors.get(f"layers.{layer}.attn{i}.{name}") for i in (1, 2))
            return first is not None and second is not None and not np.array_equal(first.load(), second.load())

        names = ("to_q.weight", "norm_q.weight", "norm_q.bias")
        if any(differs(layer, name) for layer in range(self.found_config.num_layers) for name in names):
            return dataclasses.replace(self.found_config, separate_caption_query=True)
        return self.found_config


def config_from_dict(values: dict) -> TransformerConfig:
    """A transformer's config.json, by its _class_name (each registered config's own, as its `to_dict` writes it);
    one without is diffusers' Next-DiT (LuminaNextDiT2DModel)."""
    classes = {config_class().to_dict()["_class_name"]: config_class for config_class in ARCHITECTURES}
    return classes.get(values.get("_class_name"), NextDiTConfig).from_dict(values)


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
    # diffusers' Lumina-Image 2.0 names its patch embedding as the original code does (x_embedder)
    if "patch_embedder.proj.weight" in tensors or "time_caption_embed.timestep_embedder.linear_1.weight" in tensors:
        return "diffusers"
    if "x_embedder.weight" in tensors:
        return "original"
    raise ValueError(
        f"{path}: not a {TRANSFORMER.name} checkpoint (neither 'patch_embedder.proj.weight' of diffusers nor "
        f"'x_embedder.weight' of the original Lumina code; first keys: {sorted(tensors)[:5]})"
    )


def config_from_original(tensors: Mapping[str, LazyTensor], path: Path) -> NextDiTConfig | FlagDiTConfig:
    """Read the architecture off the tensor shapes of an original checkpoint (latents have 4 channels):
    Flag-DiT's (Lumina-T2I) where it has an end-of-line token, else Next-DiT's (Lumina-Next)."""
    family = FlagDiTConfig if "eol_token" in tensors else NextDiTConfig
    try:
        hidden, patch_features = tensors["x_embedder.weight"].shape
        heads = tensors["layers.0.attention.gate"].shape[0]
        kv_width = tensors["layers.0.attention.wk.weight"].shape[0]
        caption_dim = tensors["cap_embedder.0.weight"].shape[0]
        ffn_dim = tensors["layers.0.feed_forward.w1.weight"].shape[0]
        final_features = tensors["final_layer.linear.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{path}: original {family.family_name} checkpoint without {e.args[0]!r}") from None
    in_channels = 4
    patch = math.isqrt(patch_features // in_channels)
    if patch < 1 or patch * patch * in_channels != patch_features:
        raise ValueError(
            f"{path}: x_embedder takes {patch_features} features, not the patch x patch x 4 of a latent patch "
            "(original checkpoints are read as the 4-channel latents of the SDXL VAE)"
        )
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
    ffn = ffn_fields(hidden, ffn_dim)
    if ffn is None:
        raise ValueError(f"{path}: feed-forward width {ffn_dim} matches no FFN configuration for hidden size {hidden}")
    return family(**base, **ffn)


def _original_config(
    folder: Path, tensors: Mapping[str, LazyTensor], checkpoint: Path
) -> NextDiTConfig | FlagDiTConfig:
    """The named preset of model_args.pth when there is one, else the shapes; sample size from its
    image_size, and a Flag-DiT's RoPE scaling from its rope_scaling_factor and ntk_factor."""
    config = config_from_original(tensors, checkpoint)
    args_path = folder / "model_args.pth"
    if args_path.exists():
        args = load_pth(args_path)
        preset = ARCHITECTURES[type(config)].original_presets.get(getattr(args, "model", None))
        if preset is not None:
            config = preset
        if getattr(args, "image_size", None):
            config = dataclasses.replace(config, sample_size=int(args.image_size) // 8)
        fields = {f.name for f in dataclasses.fields(config)}  # a Flag-DiT's RoPE scaling
        factors = {f: float(getattr(args, f)) for f in ("rope_scaling_factor", "ntk_factor") if hasattr(args, f)}
        config = dataclasses.replace(config, **{f: v for f, v in factors.items() if f in fields})
    return config


def unified_config_from_original(tensors: Mapping[str, LazyTensor], path: Path) -> UnifiedNextDiTConfig:
    """Read a Lumina-Image 2.0 architecture off the shapes of an original checkpoint (its keys without ComfyUI's
    prefix): RoPE axes of head_dim / 3 each, as every preset of the original code has them, and its query/key
    norms' epsilon."""
    try:
        hidden, patch_features = tensors["x_embedder.weight"].shape
        head_dim = tensors["layers.0.attention.q_norm.weight"].shape[0]
        qkv_rows = tensors["layers.0.attention.qkv.weight"].shape[0]
        caption_dim = tensors["cap_embedder.0.weight"].shape[0]
        ffn_dim = tensors["layers.0.feed_forward.w1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{path}: original Lumina-Image 2.0 checkpoint without {e.args[0]!r}") from None
    in_channels = UnifiedNextDiTConfig.in_channels
    patch = math.isqrt(patch_features // in_channels)
    if patch < 1 or patch * patch * in_channels != patch_features or head_dim % 6:
        raise ValueError(
            f"{path}: x_embedder takes {patch_features} features and heads are {head_dim} wide; expected "
            f"patch x patch x {in_channels} features (the FLUX VAE's latents) and heads of a multiple of 6"
        )
    depth = lambda stack: 1 + max(int(m[1]) for k in tensors if (m := re.match(rf"{stack}\.(\d+)\.", k)))  # noqa: E731
    ffn = ffn_fields(hidden, ffn_dim, base=4 * hidden)
    if ffn is None:
        raise ValueError(f"{path}: feed-forward width {ffn_dim} matches no FFN configuration for hidden size {hidden}")
    return UnifiedNextDiTConfig(
        patch_size=patch,
        hidden_size=hidden,
        num_layers=depth("layers"),
        num_refiner_layers=depth("context_refiner"),
        num_attention_heads=hidden // head_dim,
        num_kv_heads=(qkv_rows // head_dim - hidden // head_dim) // 2,
        axes_dim_rope=(head_dim // 3,) * 3,
        cap_feat_dim=caption_dim,
        qk_norm_eps=ORIGINAL_QK_NORM_EPS,
        **ffn,
    )


def _from_file(path: Path) -> TransformerCheckpoint:
    """One checkpoint file: original (config from shapes and model_args.pth) or diffusers (config.json beside it);
    an original Lumina-Image 2.0 one (or ComfyUI's single file) is read under diffusers' names. Of ComfyUI's
    all-in-one file only the transformer is read: its keys under ORIGINAL_PREFIX, not the VAE's and text
    encoder's beside them (load those from their own files)."""
    tensors = _read_tensor_file(path)
    if any(key.startswith(ORIGINAL_PREFIX) for key in tensors):
        tensors = {key: tensor for key, tensor in tensors.items() if key.startswith(ORIGINAL_PREFIX)}
    unprefixed = {k.removeprefix(ORIGINAL_PREFIX): v for k, v in tensors.items()}
    if "context_refiner.0.attention.qkv.weight" in unprefixed:
        config = unified_config_from_original(unprefixed, path)
        kv_width = config.kv_heads * config.head_dim
        return TransformerCheckpoint(path, config, original_tensors(tensors, config.hidden_size, kv_width), "original")
    if _layout_of(path, tensors) == "original":
        return TransformerCheckpoint(path, _original_config(path.parent, tensors, path), tensors, "original")
    if not (path.parent / "config.json").exists():
        raise ValueError(f"{path}: a diffusers checkpoint needs its config.json beside it")
    return TransformerCheckpoint(path, _read_config(path.parent / "config.json"), tensors, "diffusers", True)


def _read_config(path: Path) -> TransformerConfig:
    return importer.read_config(path, config_from_dict, TRANSFORMER.name)


class TransformerFamily(ModelFamily):
    """Every diffusion transformer family of `ARCHITECTURES`: the layouts are found by their files, the family
    by the keys or config; Next-DiT's original keys map through diffusers' names."""

    def find(self, path: str | Path, *, ema: bool = False, revision: str | None = None) -> TransformerCheckpoint:
        """Recognise the layout at `path` (or of a hub id's files, downloaded at `revision`) and read its
        config and tensor index (no tensor data: `TransformerCheckpoint.config` reads what it needs on first use);
        `ema` picks an original checkpoint's EMA weights."""
        path = hub.local_path(path, self.hub_kind, revision=revision, ema=ema)
        if path.is_file():
            return _from_file(path)
        stem = "consolidated_ema.00-of-01" if ema else "consolidated.00-of-01"
        for suffix in (".safetensors", ".pth"):
            if (path / f"{stem}{suffix}").exists():
                return _from_file(path / f"{stem}{suffix}")
        shards = sorted(
            p.name
            for p in (path.iterdir() if path.is_dir() else ())
            if hub.ORIGINAL_CHECKPOINT.fullmatch(p.name) and "-of-01." not in p.name
        )
        if shards:
            raise ValueError(
                f"{path}: {', '.join(shards)} are model-parallel shards of an original checkpoint; "
                "lumina-jax reads one-shard checkpoints (consolidated.00-of-01, as released). With qk-norm, each "
                "shard normalises its own heads' queries and keys, so merged shards are a different model"
            )
        found = importer.find_component(
            path,
            subfolder=self.subfolder,
            stem=self.stem,
            from_dict=config_from_dict,
            model_name=self.name,
            other_layouts=f"an original Lumina-Next folder with {stem}.safetensors or .pth",
        )
        if found.tensors is None:
            return TransformerCheckpoint(found.path, found.config, None, "converted")
        return TransformerCheckpoint(found.path, found.config, found.tensors, "diffusers", True)

    def model_for(self, config: TransformerConfig) -> type:
        return MODELS[type(config)]

    def key_map(self, checkpoint: TransformerCheckpoint):
        return ARCHITECTURES[type(checkpoint.config)].key_map(checkpoint)

    def load(
        self, path: str | Path, dtype: str = "float32", *, ema: bool = False, revision: str | None = None, **options
    ) -> nnx.Module:
        """A transformer of any registered family with weights from any supported layout, or a hub id's (at `revision`);
        `ema` picks the EMA weights of an original checkpoint. `options`: param_dtype, mesh, progress (as `build`), and
        the model's scan_layers, remat and attention_backend."""
        return self.build(self.find(path, ema=ema, revision=revision), dtype, **options)


def diffusers_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters under diffusers' names and layouts (Next-DiT's shared query written twice, as diffusers
    stores it), for a family with a diffusers layout."""
    config, layout = model.config, ARCHITECTURES[type(model.config)].diffusers
    return TRANSFORMER.export_state_dict(model, layout.keys(config), layout.key_to_target(config))


def save_diffusers(model: nnx.Module, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write a diffusers transformer folder, which diffusers' model class (`LuminaNextDiT2DModel`,
    `Lumina2Transformer2DModel`) loads with `from_pretrained`."""
    with orbax_io.atomic_folder(folder, overwrite=overwrite) as partial:
        orbax_io.write_config(partial, model.config.to_dict())
        write_safetensors(partial / "diffusion_pytorch_model.safetensors", diffusers_state_dict(model))
    return Path(folder)


def save_converted(model: nnx.Module, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write our format (config.json and Orbax params/), which `load_transformer` loads."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return orbax_io.write_converted(folder, model.config.to_dict(), params, overwrite=overwrite)


def _nextdit_key_map(checkpoint: TransformerCheckpoint) -> Callable[[str], Target]:
    """diffusers' keys (attn2's query to its own parameter where the checkpoint has one); the original keys
    through their diffusers names."""
    to_target = NEXT_DIT_DIFFUSERS.key_to_target(checkpoint.config)
    if checkpoint.layout == "original":
        return lambda key: to_target(nextdit_keys.original_key_to_diffusers(key))
    return to_target


class DiffusersLayout(NamedTuple):
    """A family's checkpoints in diffusers' names, each function of its config: every key, where each lands in
    our model, and the diffusers modules a LoRA file's module name adapts."""

    keys: Callable[[TransformerConfig], list[str]]
    key_to_target: Callable[[TransformerConfig], Callable[[str], Target]]
    lora_modules: Callable[[TransformerConfig], Callable[[str], list[LoraModule]]]


NEXT_DIT_DIFFUSERS = DiffusersLayout(
    lambda config: nextdit_keys.diffusers_keys(config.num_layers),
    lambda config: functools.partial(
        nextdit_keys.diffusers_key_to_target, separate_caption_query=config.separate_caption_query
    ),
    nextdit_keys.lora_modules,
)
UNIFIED_NEXT_DIT_DIFFUSERS = DiffusersLayout(
    lambda config: lumina2_keys.diffusers_keys(config.num_layers, config.num_refiner_layers),
    lambda config: lumina2_keys.diffusers_key_to_target,
    lumina2_keys.lora_modules,
)


class Architecture(NamedTuple):
    """What the weights code knows of a transformer family besides its config class."""

    model: type[nnx.Module]
    key_map: Callable[[TransformerCheckpoint], Callable[[str], Target]]  # where a found checkpoint's keys go
    diffusers: DiffusersLayout | None  # its exchange layout, and LoRA files'; None: it has none (saved as ours)
    original_presets: Mapping[str, TransformerConfig]  # the original code's model names (model_args.pth's)


# The transformer families, by config class: a new family registers here, once.
ARCHITECTURES = {
    NextDiTConfig: Architecture(NextDiT, _nextdit_key_map, NEXT_DIT_DIFFUSERS, PRESETS),
    FlagDiTConfig: Architecture(FlagDiT, lambda checkpoint: flagdit_key_to_target, None, flagdit.PRESETS),
    UnifiedNextDiTConfig: Architecture(
        UnifiedNextDiT,
        lambda checkpoint: lumina2_keys.diffusers_key_to_target,
        UNIFIED_NEXT_DIT_DIFFUSERS,
        lumina2.PRESETS,
    ),
}
MODELS = {config: architecture.model for config, architecture in ARCHITECTURES.items()}  # a config's model

TRANSFORMER = TransformerFamily(
    # in messages: "Next-DiT, Flag-DiT or Unified Next-DiT"
    name=" or ".join(", ".join(config.family_name for config in ARCHITECTURES).rsplit(", ", 1)),
    model=NextDiT,  # model_for and find pick each config's own
    config=NextDiTConfig,
    key_to_target=nextdit_keys.diffusers_key_to_target,
    subfolder="transformer",
    stem="diffusion_pytorch_model",
    hub_kind="transformer",
)
find_checkpoint = TRANSFORMER.find
parameter_shapes = TRANSFORMER.parameter_shapes
plan_import = TRANSFORMER.plan
import_params = TRANSFORMER.import_params
build_model = TRANSFORMER.build
load_transformer = TRANSFORMER.load
convert_transformer = TRANSFORMER.convert


def save_transformer(model: nnx.Module, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write the transformer in its family's exchange layout: diffusers' where it has one, else (Flag-DiT) ours."""
    save = save_diffusers if ARCHITECTURES[type(model.config)].diffusers else save_converted
    return save(model, folder, overwrite=overwrite)
