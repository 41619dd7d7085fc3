"""What a training run is: one flat dataclass, written by a config file and overridden on the command line.

A config file is a Python file with `get_config() -> TrainConfig` (see lumina_jax/configs/). Overrides
are `field=value` strings; the value is parsed as the field's type, so `steps=2000 lr=3e-4
transformer.num_layers=4` does what it says.
"""

import dataclasses
import importlib.resources
import importlib.util
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from lumina_jax.models.dit_blocks import Remat
from lumina_jax.models.family import TransformerConfig
from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.sampling import SamplerOptions
from lumina_jax.training.batches import Posterior
from lumina_jax.training.objective import CAPTION_DROPOUT, SnrType
from lumina_jax.training.step import (
    ADAM_B1,
    ADAM_B2,
    ADAM_EPS,
    EMA_DECAY,
    GRAD_CLIP,
    LEARNING_RATE,
    WEIGHT_DECAY,
)
from lumina_jax.weights.nextdit import config_from_dict


@dataclasses.dataclass
class TrainConfig:
    # Where the run lives: checkpoints/, metrics.jsonl and the exported pipeline/ go here.
    workdir: str
    # A pipeline folder (diffusers layout or converted) or hub id for the text encoder, tokenizer, VAE and, when
    # init == "pretrained", the transformer weights to fine-tune.
    pipeline: str
    # The images and captions, encoded once into `cache` (a folder; both may be gs:// paths): a JSONL manifest
    # of {"path"|"image", "prompt"|"conversations"}, a parquet file or folder of them (a Hugging Face data set;
    # columns `image_column` and `caption_column`), or an image folder with a caption file per image (a.jpg, a.txt).
    data: str
    cache: str
    init: Literal["pretrained", "scratch"] = "pretrained"
    # For init == "scratch": the transformer to build, the config of any registered family (`weights.nextdit.
    # ARCHITECTURES`): a Next-DiT (Lumina-Next), a Flag-DiT (Lumina-T2I) or a Unified Next-DiT (Lumina-Image 2.0).
    transformer: TransformerConfig = dataclasses.field(default_factory=NextDiTConfig)
    # A function "module:name" run first on every process, taking this config (e.g. writes a dataset).
    prepare: str | None = None

    image_column: str = "image"
    caption_column: str = "text"
    cache_batch_size: int = 4  # images per local device per encoder call while the cache is built
    cache_shard_size: int = 64  # examples per cache file; the unit a cache build is split and resumed in

    image_size: int = 1024  # crops near image_size^2 pixels, aspect up to max_aspect
    max_aspect: float = 4.0
    batch_size: int = 32  # global, over all devices and hosts
    steps: int = 10_000
    seed: int = 0

    lr: float = LEARNING_RATE
    warmup_steps: int = 0
    lr_decay: Literal["constant", "cosine"] = "constant"  # cosine: to 0 at `steps`
    weight_decay: float = WEIGHT_DECAY
    grad_clip: float = GRAD_CLIP
    ema_decay: float = EMA_DECAY
    caption_dropout: float = CAPTION_DROPOUT
    snr_type: SnrType = "uniform"
    # Sampled times moved towards the noise by this shift (1: not moved; Lumina-Image 2.0's trainer moves them
    # by `objective.resolution_time_shift(image_size)`).
    time_shift: float = 1.0
    # Latents from the cached VAE posteriors: "sample" (the Lumina-T2X trainers) or their "mean" (Lumina-Image 2.0's).
    posterior: Posterior = "sample"
    # 0, or k: the loss also takes every batch's latents average-pooled k x k, with their own noise and times, as
    # Lumina-Image 2.0's trainer adds its 256-px loss (k = 4 at 1024 px) to the full-size one.
    pooled_loss_factor: int = 0
    adam_b1: float = ADAM_B1
    adam_b2: float = ADAM_B2
    adam_eps: float = ADAM_EPS
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # What the backward pass recomputes: none, full, offload (full, the layer inputs kept in host memory),
    # attention_ffn or dots (`models.dit_blocks.REMAT_POLICIES`).
    remat: Remat = "none"

    # LoRA: with a rank, only low-rank adapters train, on the linear layers whose path names one of lora_targets
    # ("attention", "feed_forward", "modulation" (adaLN), or finer: "to_q"), each scaled lora_alpha / rank (None:
    # alpha = rank), dropout on its input; the transformer is frozen, held once in compute_dtype, and the run
    # exports the adapters as a PEFT LoRA file (workdir/lora/). 0 trains every weight.
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["attention"])

    # Mesh: fsdp = -1 takes every device that data and tensor leave.
    mesh_data: int = 1
    mesh_fsdp: int = -1
    mesh_tensor: int = 1

    log_every: int = 10
    # Samples of the EMA weights while training: every sample_every steps (0: never), one image of each prompt
    # (seed 0, image_size square) into workdir/samples/STEP/ and TensorBoard. On the command line the prompts
    # are a JSON list: 'sample_prompts=["a cat", "a dog"]'.
    sample_every: int = 0
    sample_prompts: list[str] = dataclasses.field(default_factory=list)
    sample_steps: int = SamplerOptions.num_inference_steps
    sample_guidance: float = SamplerOptions.guidance_scale
    save_every: int = 1000
    keep_checkpoints: int = 3
    max_consecutive_skips: int = 10  # non-finite steps in a row before the run stops
    peak_flops: float | None = None  # per device, for MFU where the device is not in the built-in table

    def __post_init__(self):
        if isinstance(self.transformer, dict):  # as the run's config.json holds it
            self.transformer = config_from_dict(self.transformer)
        for name, (allowed, description) in LIMITS.items():
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and allowed(value)):
                raise ValueError(f"{name}={value!r}: expected {description}")
        if self.lora_rank and self.init == "scratch":
            raise ValueError(f"lora_rank={self.lora_rank}: LoRA adapts a pretrained transformer; give init=pretrained")
        if self.lora_rank and not self.lora_targets:
            raise ValueError('lora_targets=[]: name the linear layers to adapt, e.g. ["attention"]')

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "transformer": self.transformer.to_dict()}, indent=1)


def _at_least(low):
    return (lambda value: value >= low), f"{low} or more"


def _between(low, high):
    return (lambda value: low <= value <= high), f"a number in [{low}, {high}]"


_POSITIVE = (lambda value: value > 0), "a number above 0"

# The range of every numeric field, checked whenever a TrainConfig is made (by a config file, an override,
# `dataclasses.replace`); `seed` takes any integer, and a None (peak_flops, lora_alpha) means unset.
LIMITS = {
    "cache_batch_size": _at_least(1),
    "cache_shard_size": _at_least(1),
    "image_size": _at_least(1),
    "max_aspect": _at_least(1.0),
    "batch_size": _at_least(1),
    "steps": _at_least(1),
    "lr": _POSITIVE,
    "warmup_steps": _at_least(0),
    "weight_decay": _at_least(0.0),
    "grad_clip": _POSITIVE,
    "ema_decay": _between(0.0, 1.0),
    "caption_dropout": _between(0.0, 1.0),
    "time_shift": _POSITIVE,
    "pooled_loss_factor": ((lambda value: value == 0 or value >= 2), "0 (no pooled loss), or 2 or more"),
    "adam_b1": ((lambda value: 0 <= value < 1), "a number in [0, 1)"),
    "adam_b2": ((lambda value: 0 <= value < 1), "a number in [0, 1)"),
    "adam_eps": _POSITIVE,
    "lora_rank": _at_least(0),
    "lora_alpha": _POSITIVE,
    "lora_dropout": ((lambda value: 0 <= value < 1), "a number in [0, 1)"),
    "mesh_data": _at_least(1),
    "mesh_fsdp": ((lambda value: value == -1 or value >= 1), "-1 (every device data and tensor leave), or 1 or more"),
    "mesh_tensor": _at_least(1),
    "log_every": _at_least(1),
    "sample_every": _at_least(0),
    "sample_steps": _at_least(1),
    "sample_guidance": _at_least(0.0),
    "save_every": _at_least(1),
    "keep_checkpoints": _at_least(1),
    "max_consecutive_skips": _at_least(1),
    "peak_flops": _POSITIVE,
}


# The shipped configs (lumina_jax/configs/NAME.py), found through their package wherever it is installed.
CONFIG_FOLDER = Path(str(importlib.resources.files("lumina_jax.configs")))


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_FOLDER.glob("*.py") if not p.stem.startswith("_"))


def load_config(name_or_path: str, overrides: list[str] = ()) -> TrainConfig:
    """A config by name (lumina_jax/configs/NAME.py) or path, with `field=value` overrides applied."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_FOLDER / f"{name_or_path}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no config {name_or_path!r}: not a file, and not one of {shipped_configs()}")
    spec = importlib.util.spec_from_file_location(f"lumina_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"{path}, line {e.lineno}: {e.msg}") from None
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file defines get_config() -> TrainConfig")
    try:
        config = module.get_config()
    except ValueError as e:  # a value out of its range
        raise ValueError(f"{path}: {e}") from None
    return apply_overrides(config, overrides)


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`field=value` overrides; `field.name=value` reaches into a field that is a dataclass itself."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected field=value")
        config = _override(config, key.split("."), text, item)
    return config


def _override(node, path: list[str], text: str, item: str):
    """`node` (a dataclass) with the field at `path` set to `text` parsed as that field's type."""
    kind = type(node)
    hints = typing.get_type_hints(kind)
    if path[0] not in hints:
        raise ValueError(f"override {item!r}: {kind.__name__} has no field {path[0]!r}; fields: {sorted(hints)}")
    if len(path) > 1:
        child = getattr(node, path[0])
        if not dataclasses.is_dataclass(child):
            raise ValueError(f"override {item!r}: {kind.__name__}.{path[0]} has no fields")
        return dataclasses.replace(node, **{path[0]: _override(child, path[1:], text, item)})
    return dataclasses.replace(node, **{path[0]: _parse(text, hints[path[0]], item)})


def _parse(text: str, kind, item: str) -> Any:
    """text as a value of type `kind` (int, float, str, bool, Literal, Optional of those; a list as JSON)."""
    if typing.get_origin(kind) is list:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        (item_kind,) = typing.get_args(kind)
        if not (isinstance(value, list) and all(isinstance(v, item_kind) for v in value)):
            raise ValueError(f'override {item!r}: expected a JSON list of {item_kind.__name__}, e.g. \'["a", "b"]\'')
        return value
    options = (
        typing.get_args(kind)
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
        else (kind,)
    )
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    for option in (o for o in options if o is not type(None)):
        if typing.get_origin(option) is Literal:
            if text in option.__args__:
                return text
            continue
        try:
            if option is bool:
                if text.lower() in ("true", "1", "yes", "false", "0", "no"):
                    return text.lower() in ("true", "1", "yes")
                continue
            return option(text)
        except (TypeError, ValueError):
            continue
    raise ValueError(f"override {item!r}: {text!r} is not a valid {kind}")
