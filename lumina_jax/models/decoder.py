"""The causal decoder parts Lumina's text encoders (Gemma, Gemma-2, LLaMA) share: reading transformers'
config.json, grouped-query self-attention with rotate-half RoPE, the gated MLP, Gemma's RMSNorm and scaled
embedding, the token inputs' checks, the causal mask, the stacked layers and the loop over them, and the
encoder around them (`DecoderEncoder`). `cfg` arguments have transformers' field names."""

import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lumina_jax.models.layers import Dtype, config_from_dict, float32_products, linear, logical_axes

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
    "cache_implementation",  # generation's KV cache (Gemma-2's "hybrid")
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


def check_decoder_sizes(cfg: Any) -> None:
    """What every decoder config checks of its sizes."""
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {cfg.num_key_value_heads}"
        )
    if cfg.head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {cfg.head_dim}")
    if cfg.num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be at least 1, got {cfg.num_hidden_layers}")


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
        return self.o_proj(self.attend(q, k, v, mask).reshape(batch, length, -1))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """Attention of q [B, L, heads, head_dim] over k, v [B, L, kv_heads, head_dim] under mask [B, 1, L, L]."""
        # XLA's implementation takes any boolean mask; the encoder runs once per prompt, so no fused kernel.
        out = jax.nn.dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask, implementation="xla")
        # A query with no key to attend to (an all-padding row, or left padding) gets zeros, as
        # transformers' default SDPA attention gives it; XLA would average every value instead.
        attends = jnp.any(mask, axis=-1)[:, 0, :, None, None]
        return jnp.where(attends, out, jnp.zeros((), out.dtype))


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


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


class GemmaRMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + weight) in float32; the weight is stored as an offset from 1
    (Gemma's and Gemma-2's)."""

    def __init__(self, features: int, *, eps: float, param_dtype: Dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((features,), param_dtype), **logical_axes("embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return normed * (1.0 + self.weight[...].astype(jnp.float32))


def token_embedding(cfg: Any, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_metadata=logical_axes("vocab", "embed"),
        rngs=rngs,
    )


def scaled_embedding(embed_tokens: nnx.Embed, input_ids: jax.Array) -> jax.Array:
    """Gemma's embedding times sqrt(hidden_size), float32 out; transformers casts the normaliser to the
    embedding's dtype before multiplying."""
    normalizer = jnp.asarray(math.sqrt(embed_tokens.features), embed_tokens.dtype)
    return (embed_tokens(input_ids) * normalizer).astype(jnp.float32)


def stacked_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` decoder layers built by make_layer(rngs), their parameters stacked on a leading "layers" axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stack(rngs):
        return make_layer(rngs)

    return stack(rngs)


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


def run_decoder_layers(
    layers: nnx.Module, x: jax.Array, layer_inputs: tuple, count: int, *, scan: bool, per_layer: tuple = ()
) -> jax.Array:
    """x through the first `count` of the stacked decoder layers, scanned or unrolled. Every layer reads
    `layer_inputs`, then its own entry of each `per_layer` array (leading axis: the layer)."""
    graphdef, stacked = nnx.split(layers)

    def layer(x, index):
        # Index the stack in place rather than slicing off unused layers, which would copy the rest.
        at = lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False)  # noqa: E731
        params, own = jax.tree.map(at, (stacked, per_layer))
        return nnx.merge(graphdef, params)(x, *layer_inputs, *own), None

    if scan:
        return jax.lax.scan(layer, x, jnp.arange(count))[0]
    for i in range(count):
        x, _ = layer(x, i)
    return x


class DecoderEncoder(nnx.Module):
    """A transformers decoder model as a caption encoder: token ids -> one of its hidden states. Parameters are
    named as in transformers (embed_tokens, layers, norm); the layers are stacked under `layers`.

    A family sets `decoder_layer`, says which hidden state it takes (`takes_last_hidden_state`: else
    hidden_states[-2], the output of the second-to-last layer, before the final norm: the last layer never
    runs, but its parameters are kept, so a released checkpoint imports strictly and exports whole), and
    overrides `final_norm`, `embed` or `layer_inputs` where it differs. `dtype` is the compute dtype,
    `param_dtype` the storage dtype; with bfloat16 compute, norms, RoPE, softmax statistics and the residual
    stream stay float32.
    """

    decoder_layer: ClassVar[Callable[..., nnx.Module]]  # (cfg, *, dtype, param_dtype, rngs) -> a layer
    takes_last_hidden_state: ClassVar[bool]

    def __init__(
        self,
        config: Any,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        cfg = self.config = config
        self.dtype, self.scan_layers = dtype, scan_layers
        self.embed_tokens = token_embedding(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        make_layer = lambda rngs: self.decoder_layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
        self.layers = stacked_layers(make_layer, cfg.num_hidden_layers, rngs)
        self.norm = self.final_norm(cfg, param_dtype=param_dtype, rngs=rngs)

    def final_norm(self, cfg: Any, *, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Module:
        """Gemma's, which Gemma-2 shares."""
        return GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Gemma's scaled embedding, which Gemma-2 shares."""
        return scaled_embedding(self.embed_tokens, input_ids)

    def layer_inputs(self, attention_mask: jax.Array) -> tuple[tuple, tuple]:
        """What every layer reads, and what each reads of its own (arrays with a leading layer axis)."""
        return causal_inputs(attention_mask, self.config), ()

    @property
    def num_layers_run(self) -> int:
        return self.config.num_hidden_layers - (0 if self.takes_last_hidden_state else 1)

    @float32_products
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids [B, L] integers and attention_mask [B, L] (1 = token, 0 = padding) -> the hidden state the
        family takes, [B, L, hidden_size] float32, padded positions included."""
        check_token_inputs(input_ids, attention_mask)
        shared, per_layer = self.layer_inputs(attention_mask)
        x = self.embed(input_ids)
        x = run_decoder_layers(self.layers, x, shared, self.num_layers_run, scan=self.scan_layers, per_layer=per_layer)
        return self.norm(x) if self.takes_last_hidden_state else x
