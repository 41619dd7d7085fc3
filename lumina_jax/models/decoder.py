"""The causal decoder parts Lumina's text encoders (Gemma, LLaMA) share: reading transformers' config.json,
grouped-query self-attention with rotate-half RoPE, the gated MLP, the token inputs' checks, the causal mask
and the loop over the stacked layers. `cfg` arguments have transformers' field names."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lumina_jax.models.layers import Dtype, config_from_dict, linear

# Keys of transformers' config.json that do not change the encoder's output.
TRANSFORMERS_BOOKKEEPING = (
    "_name_or_path",
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "bos_token_id",
    "eos_token_id",
    "initializer_range",
    "use_cache",
    "tie_word_embeddings",
    "attention_dropout",
    "pretraining_tp",  # splits the projections into slices in PyTorch; the same products
    "_attn_implementation",
    "_attn_implementation_autoset",
    "output_hidden_states",
    "return_dict",
)


def transformers_config(cls: type, values: dict[str, Any], model_type: str, model_name: str) -> Any:
    """A decoder config (`cls`, with transformers' field names) from transformers' config.json of `model_type`:
    bookkeeping keys are ignored, anything that would change the math in a way we do not reproduce is refused."""
    values = dict(values)
    found = values.get("model_type", model_type)
    if found != model_type:
        raise ValueError(f"model_type {found!r} is not supported; this encoder is {model_name} ({model_type!r})")
    if (scaling := values.pop("rope_scaling", None)) is not None:
        raise ValueError(f"rope_scaling {scaling!r} is not supported; only default RoPE")
    if values.pop("use_bidirectional_attention", None):
        raise ValueError(f"use_bidirectional_attention is not supported; {model_name} attention here is causal")
    if (rope := values.pop("rope_parameters", None)) is not None:
        # transformers >= 5 writes {"rope_type": "default", "rope_theta": ...} instead of rope_theta
        if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
            raise ValueError(f"rope_parameters {rope!r} are not supported; only default RoPE")
        if "rope_theta" in values and "rope_theta" in rope and values["rope_theta"] != rope["rope_theta"]:
            raise ValueError(f"rope_theta {values['rope_theta']} contradicts rope_parameters {rope!r}")
        values.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
    return config_from_dict(cls, values, TRANSFORMERS_BOOKKEEPING, model_name)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin [length, head_dim] for positions 0..length-1, each frequency repeated over both halves."""
    inv_freq = 1.0 / (jnp.float32(theta) ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotate_half_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, L, heads, head_dim] by cos/sin [L, head_dim], pairing dimension i with i + head_dim/2
    (not adjacent pairs, as Next-DiT does); float32 inside."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x32 * cos + rotated * sin).astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    """Causal grouped-query self-attention with rotate-half RoPE, scale head_dim**-0.5 (Gemma's and LLaMA's;
    `cfg` has transformers' field names: hidden_size, num_attention_heads, num_key_value_heads, head_dim,
    attention_bias)."""

    def __init__(self, cfg: Any, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        d, heads, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        dense = dict(use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = linear(d, heads, ("embed", "heads"), **dense)
        self.k_proj = linear(d, kv, ("embed", "kv_heads"), **dense)
        self.v_proj = linear(d, kv, ("embed", "kv_heads"), **dense)
        self.o_proj = linear(heads, d, ("heads", "embed"), **dense)

    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [B, L, hidden]; mask [B, 1, L, L], True where query i may attend to key j."""
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        q, k = apply_rotate_half_rope(q, cos, sin), apply_rotate_half_rope(k, cos, sin)
        # XLA's implementation takes any boolean mask; the encoder runs once per prompt, so no fused kernel.
        out = jax.nn.dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask, implementation="xla")
        # A query with no key to attend to (an all-padding row, or left padding) gets zeros, as
        # transformers' default SDPA attention gives it; XLA would average every value instead.
        attends = jnp.any(mask, axis=-1)[:, 0, :, None, None]
        out = jnp.where(attends, out, jnp.zeros((), out.dtype))
        return self.o_proj(out.reshape(batch, length, -1))


class GatedMLP(nnx.Module):
    """down(activation(gate x) * up x), no biases: Gemma's (tanh GELU) and LLaMA's (SiLU)."""

    def __init__(self, cfg: Any, activation, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.activation = activation
        dense = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **dense)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **dense)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


def check_token_inputs(input_ids: jax.Array, attention_mask: jax.Array) -> None:
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers [batch, length], got {input_ids.dtype} {input_ids.shape}")
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, length], got shape {attention_mask.shape}")
    if attention_mask.shape[0] != input_ids.shape[0]:
        raise ValueError(f"attention_mask has batch size {attention_mask.shape[0]}, input_ids has {input_ids.shape[0]}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} does not match input_ids {input_ids.shape}")


def causal_inputs(attention_mask: jax.Array, cfg: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What each decoder layer reads besides its input: the causal mask over the tokens [B, 1, L, L] and
    the RoPE tables of positions 0..L-1."""
    length = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    return (mask, *rope_tables(length, cfg.head_dim, cfg.rope_theta))


def run_decoder_layers(layers: nnx.Module, x: jax.Array, layer_inputs: tuple, count: int, *, scan: bool) -> jax.Array:
    """x through the first `count` of the stacked decoder layers, scanned or unrolled."""
    graphdef, stacked = nnx.split(layers)

    def layer(x, index):
        # Index the stack in place rather than slicing off unused layers, which would copy the rest.
        params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), stacked)
        return nnx.merge(graphdef, params)(x, *layer_inputs), None

    if scan:
        return jax.lax.scan(layer, x, jnp.arange(count))[0]
    for i in range(count):
        x, _ = layer(x, i)
    return x
