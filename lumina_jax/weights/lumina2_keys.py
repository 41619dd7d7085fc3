"""Where each tensor of a Lumina-Image 2.0 transformer checkpoint goes in our `UnifiedNextDiT`.

A pure function, diffusers key -> parameter target, and the list of every key for writing that layout; the
original code's checkpoints (and ComfyUI's single file) are read under diffusers' names (`original_tensors`).
Unknown keys raise `UnknownKeyError`; the importer collects them and fails with the list.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np

from lumina_jax.weights.importer import (
    LINEAR,
    LazyTensor,
    LoraModule,
    Target,
    UnknownKeyError,
    diffusers_module_name,
)

_Leaves = dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]]


def _linear(name: str, bias: bool = True) -> _Leaves:
    path = tuple(name.split("."))
    return {"weight": (path + ("kernel",), LINEAR), **({"bias": (path + ("bias",), None)} if bias else {})}


def _rms_norm(name: str) -> _Leaves:
    return {"weight": (tuple(name.split(".")) + ("scale",), None)}


# diffusers module -> {tensor name: (our parameter path, axis permutation)}
_TOP = {
    "x_embedder": _linear("patch_embedder"),
    "time_caption_embed.timestep_embedder.linear_1": _linear("time_linear_1"),
    "time_caption_embed.timestep_embedder.linear_2": _linear("time_linear_2"),
    "time_caption_embed.caption_embedder.0": _rms_norm("caption_norm"),
    "time_caption_embed.caption_embedder.1": _linear("caption_proj"),
    "norm_out.linear_1": _linear("final_modulation"),
    "norm_out.linear_2": _linear("final_linear"),
}
_BLOCK = {
    "attn.to_q": _linear("attention.to_q", bias=False),
    "attn.to_k": _linear("attention.to_k", bias=False),
    "attn.to_v": _linear("attention.to_v", bias=False),
    "attn.to_out.0": _linear("attention.to_out", bias=False),
    "attn.norm_q": _rms_norm("attention.q_norm"),
    "attn.norm_k": _rms_norm("attention.k_norm"),
    "feed_forward.linear_1": _linear("feed_forward.gate", bias=False),
    "feed_forward.linear_2": _linear("feed_forward.down", bias=False),
    "feed_forward.linear_3": _linear("feed_forward.up", bias=False),
    "norm2": _rms_norm("attention_norm2"),
    "ffn_norm1": _rms_norm("ffn_norm1"),
    "ffn_norm2": _rms_norm("ffn_norm2"),
}
# With adaLN (noise refiner, joint layers) norm1 is a LuminaRMSNormZero: the modulation and the norm;
# without (context refiner) a plain RMSNorm.
_MODULATED = {**_BLOCK, "norm1.linear": _linear("modulation"), "norm1.norm": _rms_norm("attention_norm1")}
_UNMODULATED = {**_BLOCK, "norm1": _rms_norm("attention_norm1")}
STACKS = {"context_refiner": _UNMODULATED, "noise_refiner": _MODULATED, "layers": _MODULATED}
_STACK_KEY = re.compile(r"(context_refiner|noise_refiner|layers)\.(\d+)\.(.+)")


def diffusers_key_to_target(key: str) -> Target:
    """Map a diffusers `Lumina2Transformer2DModel` state-dict key to our parameter."""
    if match := _STACK_KEY.fullmatch(key):
        stack, layer, rest = match[1], int(match[2]), match[3]
        module, _, leaf = rest.rpartition(".")
        if leaf in STACKS[stack].get(module, {}):
            path, permute = STACKS[stack][module][leaf]
            return Target((stack,) + path, layer, permute)
    else:
        module, _, leaf = key.rpartition(".")
        if leaf in _TOP.get(module, {}):
            path, permute = _TOP[module][leaf]
            return Target(path, None, permute)
    raise UnknownKeyError(key)


def diffusers_keys(num_layers: int, num_refiner_layers: int) -> list[str]:
    """Every key a diffusers `Lumina2Transformer2DModel` of these depths has, for writing that layout back out."""
    keys = [f"{module}.{leaf}" for module, leaves in _TOP.items() for leaf in leaves]
    for stack, table in STACKS.items():
        depth = num_layers if stack == "layers" else num_refiner_layers
        keys += [
            f"{stack}.{i}.{module}.{leaf}" for i in range(depth) for module, leaves in table.items() for leaf in leaves
        ]
    return keys


# The original code's names (Alpha-VLLM's Lumina-Image-2.0 `NextDiT`, whose checkpoints ComfyUI's single file
# holds under "model.diffusion_model.") -> diffusers'. Its fused qkv is split by `original_tensors`.
ORIGINAL_PREFIX = "model.diffusion_model."
UNUSED_ORIGINAL = ("norm_final.weight",)  # an RMSNorm the original builds and never calls
_ORIGINAL_TOP = {
    "x_embedder": "x_embedder",
    "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
    "cap_embedder.0": "time_caption_embed.caption_embedder.0",
    "cap_embedder.1": "time_caption_embed.caption_embedder.1",
    "final_layer.adaLN_modulation.1": "norm_out.linear_1",
    "final_layer.linear": "norm_out.linear_2",
}
_ORIGINAL_BLOCK = {
    "attention.out": "attn.to_out.0",
    "attention.q_norm": "attn.norm_q",
    "attention.k_norm": "attn.norm_k",
    "feed_forward.w1": "feed_forward.linear_1",
    "feed_forward.w2": "feed_forward.linear_2",
    "feed_forward.w3": "feed_forward.linear_3",
    "adaLN_modulation.1": "norm1.linear",
    "attention_norm2": "norm2",
    "ffn_norm1": "ffn_norm1",
    "ffn_norm2": "ffn_norm2",
}
_QKV_KEY = re.compile(r"((?:context_refiner|noise_refiner|layers)\.\d+)\.attention\.qkv\.weight")


def original_key_to_diffusers(key: str) -> str:
    """Map an original Lumina-Image 2.0 key (ComfyUI's prefix allowed) to its diffusers name; not the fused qkv."""
    key = key.removeprefix(ORIGINAL_PREFIX)
    if match := _STACK_KEY.fullmatch(key):
        stack, layer, rest = match[1], match[2], match[3]
        module, _, leaf = rest.rpartition(".")
        if module == "attention_norm1":  # norm1 is the adaLN's norm where there is one
            name = "norm1" if stack == "context_refiner" else "norm1.norm"
        else:
            name = _ORIGINAL_BLOCK.get(module)
        if name:
            return f"{stack}.{layer}.{name}.{leaf}"
    else:
        module, _, leaf = key.rpartition(".")
        if module in _ORIGINAL_TOP:
            return f"{_ORIGINAL_TOP[module]}.{leaf}"
    raise UnknownKeyError(key)


@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows start:stop of a checkpoint tensor, read when loaded (a `LazyTensor`)."""

    tensor: LazyTensor
    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.tensor.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.tensor.dtype

    def load(self) -> np.ndarray:
        return np.asarray(self.tensor.load())[self.start : self.stop]


def original_tensors(tensors: Mapping[str, LazyTensor], query_width: int, kv_width: int) -> dict[str, LazyTensor]:
    """An original checkpoint's tensors under diffusers' names, each fused qkv [q + 2 kv, hidden] split into
    to_q, to_k and to_v rows (as diffusers' single-file loader splits it) and the unused norm_final dropped.
    Keys it does not know keep their names, for the importer to list."""
    renamed = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(ORIGINAL_PREFIX)
        if name in UNUSED_ORIGINAL:
            continue
        if match := _QKV_KEY.fullmatch(name):
            if tensor.shape[0] != query_width + 2 * kv_width:
                raise ValueError(f"{key} has shape {tuple(tensor.shape)}: expected {query_width} + 2 x {kv_width} rows")
            bounds = {"to_q": (0, query_width), "to_k": (query_width, query_width + kv_width)}
            bounds["to_v"] = (query_width + kv_width, query_width + 2 * kv_width)
            renamed |= {f"{match[1]}.attn.{part}.weight": Rows(tensor, *rows) for part, rows in bounds.items()}
            continue
        try:
            renamed[original_key_to_diffusers(key)] = tensor
        except UnknownKeyError:
            renamed[key] = tensor
    return renamed


def lora_modules(config) -> Callable[[str], list[LoraModule]]:
    """A LoRA file's module name, diffusers' or the original code's, as the diffusers modules it adapts: the
    original's fused qkv shares its down projection and splits its up projection's rows into q, k and v."""
    query, kv = config.num_attention_heads * config.head_dim, config.kv_heads * config.head_dim
    rows = {"to_q": slice(0, query), "to_k": slice(query, query + kv), "to_v": slice(query + kv, query + 2 * kv)}

    def modules(name: str) -> list[LoraModule]:
        if name.endswith(".attention.qkv"):
            block = name.removesuffix(".attention.qkv")
            diffusers_key_to_target(f"{block}.attn.to_q.weight")  # a block the model has
            return [(f"{block}.attn.{part}", part_rows) for part, part_rows in rows.items()]
        return [(diffusers_module_name(name, diffusers_key_to_target, original_key_to_diffusers), None)]

    return modules
