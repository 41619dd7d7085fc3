"""Where each tensor of a diffusers `Lumina2Transformer2DModel` checkpoint goes in our `UnifiedNextDiT`.

One pure function, diffusers key -> parameter target, and the list of every key for writing that layout.
Unknown keys raise `UnknownKeyError`; the importer collects them and fails with the list.
"""

import re

from lumina_jax.weights.importer import LINEAR, Target, UnknownKeyError

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
