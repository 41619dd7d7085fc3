"""The LLaMA text encoder of Lumina-T2I (LLaMA-2-7B), in Flax NNX.

Computes what Lumina-T2I takes from `transformers.LlamaModel`: `last_hidden_state`, every layer and the
final norm. Inputs are the tokenizer's right-padded input_ids and attention_mask; the original passes no
mask, which for right padding changes only the padded positions (causal attention never reads them from
a real token), and those the transformer masks out. Shares Gemma's attention and gated MLP (`models.decoder`);
differs in its RMSNorm (the weight itself, not an offset from 1), SiLU, and no embedding scale.
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lumina_jax.models.decoder import (
    CausalSelfAttention,
    DecoderEncoder,
    GatedMLP,
    check_decoder_sizes,
    transformers_config,
)
from lumina_jax.models.layers import Dtype, rms_norm


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture, with the field names of transformers' LLaMA config.json; defaults are LLaMA-2-7B's."""

    # negative prompts cut to their prompt's length: as Lumina-T2I's pipeline does (its demo's "" never reaches the cut)
    negatives_cut_to_prompts: ClassVar[bool] = True

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # hidden_size // num_attention_heads when not given
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        check_decoder_sizes(self)
        if self.hidden_act != "silu" or self.mlp_bias:
            raise ValueError(
                f"only LLaMA's SiLU MLP without biases is supported; got hidden_act {self.hidden_act!r}, "
                f"mlp_bias {self.mlp_bias}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LlamaConfig":
        """Read transformers' config.json (`models.decoder.transformers_config`)."""
        return transformers_config(cls, values, "llama", "LLaMA")

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["LlamaModel"], "model_type": "llama", **dataclasses.asdict(self)}

    def prepare_captions(self, texts: list[str], system_prompt: str | None = None) -> list[str]:
        """As typed: Lumina-T2I's demo encodes captions so (without a system prompt)."""
        if system_prompt is not None:
            raise ValueError("system_prompt is Lumina-Image 2.0's (Gemma-2); Lumina-T2I's captions have none")
        return texts

    def training_captions(self, texts: list[str]) -> list[str]:
        """As at sampling time: the cache encodes them as the pipeline does."""
        return self.prepare_captions(texts)

    def load_tokenizer(self, folder):
        """Lumina-T2I's LLaMA tokenizer: <s> and </s> around every caption (add_bos_token, add_eos_token) and,
        as LLaMA has no pad token, its <unk> (id 0, the original's padding) to pad with."""
        from transformers import AutoTokenizer  # here, not at import: transformers takes seconds to import

        tokenizer = AutoTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token
        empty = tokenizer("").input_ids
        if empty != [tokenizer.bos_token_id, tokenizer.eos_token_id]:
            raise ValueError(
                f"{folder}: Lumina-T2I encodes captions between <s> and </s>, but this tokenizer "
                f"({type(tokenizer).__name__}) encodes the empty caption as {empty}"
            )
        return tokenizer


LLAMA_2_7B = LlamaConfig()


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm attention and MLP, each added to the float32 residual stream."""

    def __init__(self, cfg: LlamaConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = rms_norm(cfg.hidden_size, "embed", **norm)
        self.self_attn = CausalSelfAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = rms_norm(cfg.hidden_size, "embed", **norm)
        self.mlp = GatedMLP(cfg, jax.nn.silu, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, mask, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x).astype(x.dtype), mask, cos, sin).astype(jnp.float32)
        return x + self.mlp(self.post_attention_layernorm(x)).astype(jnp.float32)


class LlamaEncoder(DecoderEncoder):
    """LLaMA as Lumina-T2I's text encoder: token ids -> last_hidden_state (`DecoderEncoder`)."""

    decoder_layer = LlamaDecoderLayer
    takes_last_hidden_state = True

    def final_norm(self, cfg: LlamaConfig, *, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Module:
        return rms_norm(cfg.hidden_size, "embed", eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Not scaled, unlike Gemma's."""
        return self.embed_tokens(input_ids).astype(jnp.float32)
