"""LoRA adapters in the layouts they circulate in, merged into a transformer's weights; adapters trained here
(`models.lora`) written as a PEFT LoRA file in diffusers' names (`save_lora`).

A LoRA file holds, for each adapted linear layer, a down projection A [rank, in] and an up projection
B [out, rank], and the merged weight is W + scale * (alpha / rank) * B @ A. The files name the layer in one
of three ways, all read here:

- diffusers / PEFT: `transformer.layers.0.attn.to_q.lora_A.weight` and `lora_B`, diffusers' module names;
  alpha in the safetensors metadata (`lora_adapter_metadata`, as diffusers' save_lora_weights writes it),
  else alpha = rank, as diffusers assumes.
- ComfyUI and ai-toolkit: `diffusion_model.layers.0.attention.qkv.lora_A.weight`, the original code's names,
  whose fused qkv (Lumina-Image 2.0) shares A and splits B's rows into q, k and v, as diffusers' converter does.
- kohya: `lora_unet_layers_0_attention_qkv.lora_down.weight`, `lora_up` and `alpha`, the original names with
  every dot written as an underscore.

Each layer's name goes through the family's key map, so an unknown layer, or a delta whose shape does not fit
its weight, is an error naming the file and the key.
"""

import dataclasses
import functools
import itertools
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lumina_jax.models.lora import LowRank, adaptable_layers, attach, kernel_axes
from lumina_jax.weights.importer import LINEAR, LoraModule, Target, UnknownKeyError
from lumina_jax.weights.nextdit import ARCHITECTURES, DiffusersLayout
from lumina_jax.weights.safetensors_io import read_safetensors, read_safetensors_metadata, write_safetensors

_PARTS = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up"}
_PARTS |= {"alpha": "alpha"}
# removed from module names; kohya's "lora_unet_" stays, and marks the names whose dots are underscores
_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
_KOHYA_PREFIX = "lora_unet_"
_MAX_UNDERSCORES = 12  # kohya names: every split of the name at its underscores is tried
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file diffusers' load_lora_weights(folder) reads


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted linear layer: W += (alpha / rank) * up @ down, in torch's [out, in] layout."""

    down: np.ndarray  # [rank, in]
    up: np.ndarray  # [out, rank]
    alpha: float
    rslora: bool = False  # PEFT's use_rslora: alpha / sqrt(rank)

    @property
    def scaling(self) -> float:
        rank = self.down.shape[0]
        return self.alpha / (np.sqrt(rank) if self.rslora else rank)


@dataclasses.dataclass(frozen=True)
class AdaptedWeight:
    """One weight's adapter in our layout: kernel [in, out] += scaling * down @ up."""

    down: np.ndarray  # [in, rank]
    up: np.ndarray  # [rank, out]
    scaling: float

    def delta(self, scale: float) -> np.ndarray:
        return (scale * self.scaling) * (self.down.astype(np.float32) @ self.up.astype(np.float32))

    def same_as(self, other: "AdaptedWeight") -> bool:
        return (
            self.scaling == other.scaling
            and np.array_equal(self.down, other.down)
            and np.array_equal(self.up, other.up)
        )


def read_lora(path: str | Path) -> dict[str, LoraLayer]:
    """The layers of a LoRA safetensors file (or of a folder's pytorch_lora_weights.safetensors, as diffusers
    saves it), by their module name in the file (prefixes removed, kohya's underscores kept)."""
    path = Path(path)
    path = path / LORA_WEIGHT_NAME if path.is_dir() else path
    tensors = read_safetensors(path)
    peft = _peft_metadata(path)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        module, part = _split_key(key, path)
        parts.setdefault(module, {})[part] = np.asarray(tensor.load())
    layers = {}
    for module, found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "lora_A (lora_down)" if "down" not in found else "lora_B (lora_up)"
            raise ValueError(f"{path}: {module} has no {missing} weight")
        down, up = found["down"], found["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"{path}: {module}'s down {tuple(down.shape)} and up {tuple(up.shape)} are not "
                "[rank, in] and [out, rank]"
            )
        alpha = float(found["alpha"]) if "alpha" in found else peft.alpha_of(module, down.shape[0])
        layers[module] = LoraLayer(down, up, alpha, peft.rslora)
    return layers


def _split_key(key: str, path: Path) -> tuple[str, str]:
    for suffix, part in _PARTS.items():
        if key.endswith("." + suffix):
            module = key.removesuffix("." + suffix)
            prefix = next((prefix for prefix in _PREFIXES if module.startswith(prefix)), "")
            return module.removeprefix(prefix), part
    raise ValueError(f"{path}: {key} is not a LoRA weight (lora_A/lora_B, lora_down/lora_up or alpha)")


def _peft_metadata(path: Path) -> "_PeftMetadata":
    """The adapter's PEFT config as diffusers' save_lora_weights stores it (`lora_adapter_metadata`, its keys
    under "transformer."), where the file has one."""
    stored = json.loads(read_safetensors_metadata(path).get("lora_adapter_metadata") or "{}")
    config = {key.removeprefix("transformer."): value for key, value in stored.items()}
    if config.get("use_dora"):
        raise ValueError(f"{path}: a DoRA adapter (use_dora), which merges differently: not supported")
    return _PeftMetadata(config.get("lora_alpha"), config.get("alpha_pattern") or {}, bool(config.get("use_rslora")))


@dataclasses.dataclass(frozen=True)
class _PeftMetadata:
    alpha: float | None
    alpha_pattern: Mapping[str, float]
    rslora: bool

    def alpha_of(self, module: str, rank: int) -> float:
        """PEFT's: the alpha_pattern entry that ends the module's name, else lora_alpha, else (no metadata) the
        rank, as diffusers assumes."""
        for pattern, value in self.alpha_pattern.items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                return float(value)
        return float(self.alpha) if self.alpha is not None else float(rank)


def _layout(config, source) -> DiffusersLayout:
    """The transformer family's diffusers layout, the names LoRA files use."""
    layout = ARCHITECTURES[type(config)].diffusers
    if layout is None:
        raise ValueError(f"{source}: LoRA is not supported for the {config.family_name} transformer")
    return layout


def _resolve(name: str, modules: Callable[[str], list[LoraModule]]) -> list[LoraModule]:
    """The diffusers modules of a file's module name; kohya's underscores are tried as dots in every split."""
    candidates = [name]
    if name.startswith(_KOHYA_PREFIX):
        pieces = name.removeprefix(_KOHYA_PREFIX).split("_")
        if len(pieces) - 1 > _MAX_UNDERSCORES:
            raise UnknownKeyError(name)
        candidates = []
        for joins in itertools.product("._", repeat=len(pieces) - 1):
            candidates.append(pieces[0] + "".join(join + piece for join, piece in zip(joins, pieces[1:])))
    found = []
    for candidate in candidates:
        try:
            found.append(modules(candidate))
        except UnknownKeyError:
            continue
    if len(found) != 1:
        raise UnknownKeyError(name)
    return found[0]


def adapted_weights(
    model: nnx.Module, layers: Mapping[str, LoraLayer], source: str | Path
) -> dict[Target, AdaptedWeight]:
    """Each adapted weight of the transformer, by its parameter target, with its adapter in our layout."""
    config = model.config
    layout = _layout(config, source)
    to_modules, to_target = layout.lora_modules(config), layout.key_to_target(config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    adapted: dict[Target, AdaptedWeight] = {}
    sources: dict[Target, str] = {}
    unknown = []
    for name, layer in layers.items():
        try:
            modules = _resolve(name, to_modules)
        except UnknownKeyError:
            unknown.append(name)
            continue
        for module, rows in modules:
            target = to_target(module + ".weight")
            up = layer.up if rows is None else layer.up[rows]
            expected = _weight_shape(params, target, module, source)
            if (up.shape[0], layer.down.shape[1]) != expected or target.permute != LINEAR:
                raise ValueError(
                    f"{source}: {name} gives {module}.weight a delta of shape {(up.shape[0], layer.down.shape[1])}; "
                    f"the weight is {expected}"
                )
            weight = AdaptedWeight(np.ascontiguousarray(layer.down.T), np.ascontiguousarray(up.T), layer.scaling)
            if target in adapted:
                # diffusers' two copies of Next-DiT's shared query are one parameter here: the same adapter or none
                if not adapted[target].same_as(weight):
                    raise ValueError(
                        f"{source}: {name} and {sources[target]} adapt one shared weight ({module}) differently"
                    )
                continue
            adapted[target], sources[target] = weight, name
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} LoRA layer(s) fit no weight of the transformer: {unknown[:5]}")
    return adapted


def _weight_shape(params: dict, target: Target, module: str, source: str | Path) -> tuple[int, ...]:
    value = params
    for step in target.path:
        value = value[step]
    if target.layer is not None and target.layer >= value.shape[0]:
        raise ValueError(f"{source}: {module} is past the transformer's {value.shape[0]} layers of that stack")
    shape = tuple(value.shape) if target.layer is None else tuple(value.shape[1:])
    # in torch's layout, to compare with the file's
    return shape if target.permute is None else tuple(shape[i] for i in np.argsort(target.permute))


@jax.jit
def _add(weight: jax.Array, delta: jax.Array, layer: jax.Array) -> jax.Array:
    """weight[layer] + delta, in float32, back in the weight's dtype (layer -1: the whole weight)."""
    if weight.ndim == delta.ndim:
        return (weight.astype(jnp.float32) + delta).astype(weight.dtype)
    current = jax.lax.dynamic_index_in_dim(weight, layer, keepdims=False).astype(jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(weight, (current + delta).astype(weight.dtype), layer, 0)


def merge_lora(model: nnx.Module, path: str | Path, scale: float = 1.0) -> nnx.Module:
    """Merge the LoRA file at `path` into the transformer's weights, times `scale`, in place; returns it."""
    adapted = adapted_weights(model, read_lora(path), path)
    state = nnx.state(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    for target, weight in adapted.items():
        *parents, leaf = target.path
        holder = functools.reduce(lambda tree, step: tree[step], parents, params)
        layer = -1 if target.layer is None else target.layer
        holder[leaf] = _add(holder[leaf], jnp.asarray(weight.delta(scale), jnp.float32), jnp.int32(layer))
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


@dataclasses.dataclass(frozen=True)
class AttachedLora:
    """Where one LoRA file's adapters sit among a model's unmerged adapters: for each adapted linear layer (by
    its path), the first of its ranks and their factors at strength 1 (zero for the layers of a stack the file
    leaves alone)."""

    ranks: Mapping[tuple[str, ...], tuple[int, np.ndarray]]  # path -> (start, factors [..., rank])

    def set_scale(self, model: nnx.Module, scale: float) -> None:
        """Change the adapters' strength to `scale`: variables' values, so a compiled program stays valid."""
        layers = adaptable_layers(model)
        for path, (start, factors) in self.ranks.items():
            variable = layers[path].adapter.scale
            stop = start + factors.shape[-1]
            variable[...] = variable[...].at[..., start:stop].set(jnp.asarray(factors * scale, variable.dtype))


def attach_lora(model: nnx.Module, path: str | Path, scale: float = 1.0) -> AttachedLora:
    """Put the LoRA file at `path` beside the transformer's weights, unmerged (`models.lora`): each adapted
    layer computes W x + scale * (alpha / rank) B A x, the strength a variable `AttachedLora.set_scale` changes
    without recompiling, beside the adapters already there. In place."""
    by_layer: dict[tuple[str, ...], list[tuple[int | None, AdaptedWeight]]] = {}
    for target, weight in adapted_weights(model, read_lora(path), path).items():
        by_layer.setdefault(target.path[:-1], []).append((target.layer, weight))
    layers = adaptable_layers(model)
    ranks = {}
    for module, parts in by_layer.items():
        linear = layers[module]
        *lead, fan_in, fan_out = linear.kernel.shape
        rank = max(weight.down.shape[1] for _, weight in parts)
        down = np.zeros((*lead, fan_in, rank), np.float32)
        up = np.zeros((*lead, rank, fan_out), np.float32)
        factors = np.zeros((*lead, rank), np.float32)
        for index, weight in parts:  # a stack's layers the file adapts; a rank short of the most padded with zeros
            at = ... if index is None else index
            down[at][..., : weight.down.shape[1]] = weight.down
            up[at][..., : weight.up.shape[0], :] = weight.up
            factors[at][..., : weight.down.shape[1]] = weight.scaling
        ranks[module] = (0 if linear.adapter is None else linear.adapter.scale.shape[-1], factors)
        dtype = linear.kernel.dtype
        halves = jnp.asarray(down, dtype), jnp.asarray(up, dtype)
        attach(linear, LowRank(*halves, factors * scale, kernel_axes(linear.kernel), dtype=linear.dtype))
    return AttachedLora(ranks)


def lora_state_dict(model: nnx.Module) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The model's adapters (`models.lora`, one rank and alpha for all) as PEFT LoRA tensors under diffusers'
    module names (`transformer.NAME.lora_A.weight` [rank, in], `lora_B.weight` [out, rank], float32), and their
    PEFT config. Next-DiT's shared query is written under both of diffusers' names for it, as its weight is."""
    config = model.config
    layout = _layout(config, "exporting LoRA")
    to_target = layout.key_to_target(config)
    adapters = {path: layer.adapter for path, layer in adaptable_layers(model).items() if layer.adapter is not None}
    if not adapters:
        raise ValueError("the transformer has no LoRA adapters to export")
    # on the host once: a stacked adapter serves every layer's key
    host = jax.device_get({path: (a.down[...], a.up[...], a.scale[...]) for path, a in adapters.items()})
    tensors, modules = {}, []
    for key in layout.keys(config):
        target = to_target(key)
        path = target.path[:-1]
        if target.path[-1] != "kernel" or path not in host:
            continue
        module = key.removesuffix(".weight")
        for half, array in zip(("lora_A", "lora_B"), host[path][:2]):
            array = array if target.layer is None else array[target.layer]
            tensors[f"transformer.{module}.{half}.weight"] = np.ascontiguousarray(array.T, np.float32)
        modules.append(module)
    scales = {float(x) for _, _, scale in host.values() for x in np.ravel(scale)}
    ranks = {down.shape[-1] for down, _, _ in host.values()}
    if len(scales) != 1 or len(ranks) != 1:
        raise ValueError(f"a PEFT LoRA file has one rank and alpha; these adapters have ranks {ranks}, scales {scales}")
    (rank,), (scale,) = ranks, scales
    return tensors, {"r": rank, "lora_alpha": scale * rank, "target_modules": modules}


def save_lora(model: nnx.Module, path: str | Path) -> Path:
    """Write the model's adapters as a PEFT LoRA safetensors file (`lora_state_dict`), its config in the metadata
    as diffusers' save_lora_weights stores it: `Lumina2Pipeline.load_lora_weights`, peft and `read_lora` read it."""
    tensors, peft_config = lora_state_dict(model)
    stored = {f"transformer.{key}": value for key, value in peft_config.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(stored, indent=2, sort_keys=True)}
    write_safetensors(Path(path), tensors, metadata)
    return Path(path)
