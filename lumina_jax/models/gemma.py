"""The Gemma text encoder of Lumina-Next, in Flax NNX.

Computes what Lumina's pipeline takes from `transformers.GemmaModel`: `hidden_states[-2]`, the output
of decoder layer num_hidden_layers - 2, before the final norm. So only the first num_hidden_layers - 1
layers run; the last layer and the final norm are still parameters, so a released checkpoint imports
strictly and exports whole. Inputs are the tokenizer's right-padded input_ids and attention_mask;
positions are 0..L-1 whatever the padding, as transformers numbers them.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lumina_jax.models.decoder import (
    CausalSelfAttention,
    GatedMLP,
    causal_inputs,
    check_token_inputs,
    run_decoder_layers,
    transformers_config,
)
from lumina_jax.models.layers import Dtype, float32_products, logical_axes

# transformers >= 4.39 reads the legacy "gelu" of the first Gemma releases as the tanh approximation.
_TANH_GELU_NAMES = {"gelu", "gelu_pytorch_tanh"}


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture, with the field names and defaults of transformers' Gemma config.json (gemma-7b's).

    max_position_embeddings and pad_token_id change no numbers (positions beyond the former are
    rotated all the same, as in transformers); they are kept so a converted folder says what it holds.
    """

    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str | None = None
    attention_bias: bool = False
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be at least 1, got {self.num_hidden_layers}")
        if self.hidden_act not in _TANH_GELU_NAMES or self.hidden_activation not in (None, "gelu_pytorch_tanh"):
            raise ValueError(
                f"only the tanh-approximated GELU of Gemma is supported (hidden_act 'gelu' or 'gelu_pytorch_tanh', "
                f"hidden_activation null or 'gelu_pytorch_tanh'); got hidden_act {self.hidden_act!r}, "
                f"hidden_activation {self.hidden_activation!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GemmaConfig":
        """Read transformers' config.json (`models.decoder.transformers_config`)."""
        return transformers_config(cls, values, "gemma", "Gemma")

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["GemmaModel"], "model_type": "gemma", **dataclasses.asdict(self)}

    def prepare_captions(self, texts: list[str]) -> list[str]:
        """Lower-cased and stripped: diffusers cleans Lumina-Next's captions (clean_caption=True) only when
        beautifulsoup4 and ftfy are installed; lumina-jax depends on neither, so this is diffusers' behaviour
        without them."""
        return [t.lower().strip() for t in texts]

    def load_tokenizer(self, folder):
        """Gemma's tokenizer as transformers loads it."""
        from transformers import AutoTokenizer  # here, not at import: transformers takes seconds to import

        return AutoTokenizer.from_pretrained(folder)


GEMMA_2B = GemmaConfig(
    vocab_size=256000,
    hidden_size=2048,
    intermediate_size=16384,
    num_hidden_layers=18,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


class GemmaRMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + weight) in float32; the weight is stored as an offset from 1."""

    def __init__(self, features: int, *, eps: float, param_dtype: Dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((features,), param_dtype), **logical_axes("embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return normed * (1.0 + self.weight[...].astype(jnp.float32))


class GemmaDecoderLayer(nnx.Module):
    """Pre-norm attention and MLP, each added to the float32 residual stream."""

    def __init__(self, cfg: GemmaConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)
        self.self_attn = CausalSelfAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)
        self.mlp = GatedMLP(cfg, gelu_tanh, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, mask, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), mask, cos, sin).astype(jnp.float32)
        return x + self.mlp(self.post_attention_layernorm(x)).astype(jnp.float32)


class GemmaEncoder(nnx.Module):
    """Gemma as Lumina-Next's text encoder: token ids -> the features of hidden_states[-2].

    `dtype` is the compute dtype, `param_dtype` the storage dtype; with bfloat16 compute, norms,
    RoPE, softmax statistics and the residual stream stay float32. Parameters are named as in
    transformers' GemmaModel; the layers are stacked under `layers`.
    """

    def __init__(
        self,
        config: GemmaConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        cfg = self.config = config
        self.dtype, self.scan_layers = dtype, scan_layers
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_metadata=logical_axes("vocab", "embed"),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_layers(rngs):
            return GemmaDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = stacked_layers(rngs)
        self.norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    @property
    def num_layers_run(self) -> int:
        """hidden_states[-2] is the output of the second-to-last layer: the last one never runs."""
        return self.config.num_hidden_layers - 1

    @float32_products
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids [B, L] integers and attention_mask [B, L] (1 = token, 0 = padding) ->
        hidden_states[-2] of transformers' GemmaModel, [B, L, hidden_size] float32, padded positions included."""
        check_token_inputs(input_ids, attention_mask)
        # transformers casts the normaliser sqrt(hidden_size) to the embedding's dtype before multiplying.
        normalizer = jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)
        x = (self.embed_tokens(input_ids) * normalizer).astype(jnp.float32)
        layer_inputs = causal_inputs(attention_mask, self.config)
        return run_decoder_layers(self.layers, x, layer_inputs, self.num_layers_run, scan=self.scan_layers)
