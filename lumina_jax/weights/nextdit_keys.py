"""Where each tensor of a released Next-DiT checkpoint goes in our `NextDiT`.

Two pure functions: original Lumina-Next key -> diffusers key, and diffusers key -> parameter
target. Unknown keys raise `UnknownKeyError`; the importer collects them and fails with the list.
"""

import re
from collections.abc import Callable

from lumina_jax.weights.importer import LINEAR, LoraModule, Target, UnknownKeyError, diffusers_module_name


def _linear(name: str) -> dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]]:
    path = tuple(name.split("."))
    return {"weight": (path + ("kernel",), LINEAR), "bias": (path + ("bias",), None)}


def _norm(name: str) -> dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]]:
    path = tuple(name.split("."))
    return {"weight": (path + ("scale",), None), "bias": (path + ("bias",), None)}


# diffusers module -> {tensor name: (our parameter path, axis permutation)}. diffusers stores the shared query
# projection and its norm twice (attn1 and attn2): both copies map to one parameter.
_TOP = {
    "patch_embedder.proj": _linear("patch_embedder"),
    "time_caption_embed.timestep_embedder.linear_1": _linear("time_linear_1"),
    "time_caption_embed.timestep_embedder.linear_2": _linear("time_linear_2"),
    "time_caption_embed.caption_embedder.0": _norm("caption_pool_norm"),
    "time_caption_embed.caption_embedder.1": _linear("caption_proj"),
    "norm_out.linear_1": _linear("final_modulation"),
    "norm_out.linear_2": _linear("final_linear"),
}
_LAYER = {
    "attn1.to_q": _linear("attention.to_q"),
    "attn2.to_q": _linear("attention.to_q"),
    "attn1.norm_q": _norm("attention.q_norm"),
    "attn2.norm_q": _norm("attention.q_norm"),
    "attn1.to_k": _linear("attention.to_k"),
    "attn1.to_v": _linear("attention.to_v"),
    "attn1.norm_k": _norm("attention.k_norm"),
    "attn2.to_k": _linear("attention.to_k_caption"),
    "attn2.to_v": _linear("attention.to_v_caption"),
    "attn2.norm_k": _norm("attention.k_caption_norm"),
    "attn2.to_out.0": _linear("attention.to_out"),
    "feed_forward.linear_1": _linear("feed_forward.gate"),
    "feed_forward.linear_2": _linear("feed_forward.down"),
    "feed_forward.linear_3": _linear("feed_forward.up"),
    "norm1.linear": _linear("modulation"),
    "norm1.norm": _norm("attention_norm1"),
    "norm2": _norm("attention_norm2"),
    "ffn_norm1": _norm("ffn_norm1"),
    "ffn_norm2": _norm("ffn_norm2"),
    "norm1_context": _norm("caption_norm"),
}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


# A model whose two copies differ (fine-tuned with diffusers, where they are separate parameters)
# keeps the second as the caption branch's own query.
_CAPTION_QUERY = {"attn2.to_q": _linear("attention.to_q_caption"), "attn2.norm_q": _norm("attention.q_caption_norm")}


def diffusers_key_to_target(key: str, *, separate_caption_query: bool = False) -> Target:
    """Map a diffusers `LuminaNextDiT2DModel` state-dict key to our parameter (attn2's query to a
    parameter of its own with `separate_caption_query`, else to the shared query)."""
    if key == "pad_token":
        return Target(("pad_token",))
    if match := _LAYER_KEY.fullmatch(key):
        layer, rest = int(match[1]), match[2]
        if rest == "gate":
            return Target(("layers", "attention", "gate"), layer)
        module, _, leaf = rest.rpartition(".")
        table = {**_LAYER, **_CAPTION_QUERY} if separate_caption_query else _LAYER
        if module in table and leaf in table[module]:
            path, permute = table[module][leaf]
            return Target(("layers",) + path, layer, permute)
    else:
        module, _, leaf = key.rpartition(".")
        if module in _TOP and leaf in _TOP[module]:
            path, permute = _TOP[module][leaf]
            return Target(path, None, permute)
    raise UnknownKeyError(key)


_ORIGINAL_TOP = {
    "x_embedder": "patch_embedder.proj",
    "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
    "cap_embedder.0": "time_caption_embed.caption_embedder.0",
    "cap_embedder.1": "time_caption_embed.caption_embedder.1",
    "final_layer.adaLN_modulation.1": "norm_out.linear_1",
    "final_layer.linear": "norm_out.linear_2",
}
_ORIGINAL_LAYER = {
    "attention.wq": "attn1.to_q",
    "attention.q_norm": "attn1.norm_q",
    "attention.wk": "attn1.to_k",
    "attention.wv": "attn1.to_v",
    "attention.k_norm": "attn1.norm_k",
    "attention.wk_y": "attn2.to_k",
    "attention.wv_y": "attn2.to_v",
    "attention.ky_norm": "attn2.norm_k",
    "attention.wo": "attn2.to_out.0",
    "attention_y_norm": "norm1_context",
    "feed_forward.w1": "feed_forward.linear_1",
    "feed_forward.w2": "feed_forward.linear_2",
    "feed_forward.w3": "feed_forward.linear_3",
    "adaLN_modulation.1": "norm1.linear",
    "attention_norm1": "norm1.norm",
    "attention_norm2": "norm2",
    "ffn_norm1": "ffn_norm1",
    "ffn_norm2": "ffn_norm2",
}


def original_key_to_diffusers(key: str) -> str:
    """Map an original Lumina-Next (`NextDiT`) key to its diffusers name."""
    if key == "pad_token":
        return key
    if match := _LAYER_KEY.fullmatch(key):
        layer, rest = match[1], match[2]
        if rest == "attention.gate":
            return f"layers.{layer}.gate"
        module, _, leaf = rest.rpartition(".")
        if module in _ORIGINAL_LAYER:
            return f"layers.{layer}.{_ORIGINAL_LAYER[module]}.{leaf}"
    else:
        module, _, leaf = key.rpartition(".")
        if module in _ORIGINAL_TOP:
            return f"{_ORIGINAL_TOP[module]}.{leaf}"
    raise UnknownKeyError(key)


def diffusers_keys(num_layers: int) -> list[str]:
    """Every key a diffusers Next-DiT with qk_norm has, for writing that layout back out."""
    top = [f"{module}.{leaf}" for module, leaves in _TOP.items() for leaf in leaves]
    per_layer = ["gate"] + [f"{module}.{leaf}" for module, leaves in _LAYER.items() for leaf in leaves]
    return ["pad_token"] + top + [f"layers.{i}.{key}" for i in range(num_layers) for key in per_layer]


def lora_modules(config) -> Callable[[str], list[LoraModule]]:
    """A LoRA file's module name, diffusers' or the original code's, as the diffusers module it adapts."""
    return lambda name: [(diffusers_module_name(name, diffusers_key_to_target, original_key_to_diffusers), None)]
