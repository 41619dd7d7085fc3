"""Where each tensor of an original Lumina-T2I (Flag-DiT, `DiT_Llama`) checkpoint goes in our `FlagDiT`.

One pure function, original key -> parameter target. Unknown keys raise `UnknownKeyError`; the importer
collects them and fails with the list.
"""

import re

from lumina_jax.weights.importer import LINEAR, Target, UnknownKeyError


def _linear(name: str, bias: bool = True) -> dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]]:
    path = tuple(name.split("."))
    return {"weight": (path + ("kernel",), LINEAR), **({"bias": (path + ("bias",), None)} if bias else {})}


def _norm(name: str, bias: bool = True) -> dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]]:
    """A LayerNorm (weight and bias) or, without bias, an RMSNorm."""
    path = tuple(name.split("."))
    return {"weight": (path + ("scale",), None), **({"bias": (path + ("bias",), None)} if bias else {})}


# original module -> {tensor name: (our parameter path, axis permutation)}; the blocks' projections have no
# biases but the modulation's, and their RMSNorms none.
_TOP = {
    "x_embedder": _linear("patch_embedder"),
    "t_embedder.mlp.0": _linear("time_linear_1"),
    "t_embedder.mlp.2": _linear("time_linear_2"),
    "cap_embedder.0": _norm("caption_pool_norm"),
    "cap_embedder.1": _linear("caption_proj"),
    "final_layer.adaLN_modulation.1": _linear("final_modulation"),
    "final_layer.linear": _linear("final_linear"),
}
_LAYER = {
    "attention.wq": _linear("attention.to_q", bias=False),
    "attention.wk": _linear("attention.to_k", bias=False),
    "attention.wv": _linear("attention.to_v", bias=False),
    "attention.wo": _linear("attention.to_out", bias=False),
    "attention.wk_y": _linear("attention.to_k_caption", bias=False),
    "attention.wv_y": _linear("attention.to_v_caption", bias=False),
    "attention.q_norm": _norm("attention.q_norm"),
    "attention.k_norm": _norm("attention.k_norm"),
    "attention.ky_norm": _norm("attention.k_caption_norm"),
    "feed_forward.w1": _linear("feed_forward.gate", bias=False),
    "feed_forward.w2": _linear("feed_forward.down", bias=False),
    "feed_forward.w3": _linear("feed_forward.up", bias=False),
    "attention_norm": _norm("attention_norm", bias=False),
    "ffn_norm": _norm("ffn_norm", bias=False),
    "attention_y_norm": _norm("caption_norm", bias=False),
    "adaLN_modulation.1": _linear("modulation"),
}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def original_key_to_target(key: str) -> Target:
    """Map an original Flag-DiT state-dict key to our parameter."""
    if key in ("eol_token", "pad_token"):
        return Target((key,))
    if match := _LAYER_KEY.fullmatch(key):
        layer, rest = int(match[1]), match[2]
        if rest == "attention.gate":
            return Target(("layers", "attention", "gate"), layer)
        module, _, leaf = rest.rpartition(".")
        if module in _LAYER and leaf in _LAYER[module]:
            path, permute = _LAYER[module][leaf]
            return Target(("layers",) + path, layer, permute)
    else:
        module, _, leaf = key.rpartition(".")
        if module in _TOP and leaf in _TOP[module]:
            path, permute = _TOP[module][leaf]
            return Target(path, None, permute)
    raise UnknownKeyError(key)
