"""The Gemma text encoder of Lumina-Next, in Flax NNX.

Computes what Lumina's pipeline takes from `transformers.GemmaModel`: `hidden_states[-2]`, the output
of decoder layer num_hidden_layers - 2, before the final norm. So only the first num_hidden_layers - 1
layers run; the last layer and the final norm are still parameters, so a released checkpoint imports
strictly and exports whole. Inputs are the tokenizer's right-padded input_ids and attention_mask;
positions are 0..L-1 whatever the padding, as transformers numbers them.
"""

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx

from lumina_jax.models.decoder import (
    CausalSelfAttention,
    DecoderEncoder,
    GatedMLP,
    GemmaRMSNorm,
    check_decoder_sizes,
    gelu_tanh,
    transformers_config,
)
from lumina_jax.models.layers import Dtype

# transformers >= 4.39 reads the legacy "gelu" of the first Gemma releases as the tanh approximation.
_TANH_GELU_NAMES = {"gelu", "gelu_pytorch_tanh"}


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture, with the field names and defaults of transformers' Gemma config.json (gemma-7b's).

    max_position_embeddings and pad_token_id change no numbers (positions beyond the former are
    rotated all the same, as in transformers); they are kept so a converted folder says what it holds.
    """

    # negative prompts cut to their prompt's length: as diffusers' LuminaPipeline cuts them
    negatives_cut_to_prompts: ClassVar[bool] = True

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
        check_decoder_sizes(self)
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

    def prepare_captions(self, texts: list[str], system_prompt: str | None = None) -> list[str]:
        """Lower-cased and stripped: diffusers cleans Lumina-Next's captions (clean_caption=True) only when
        beautifulsoup4 and ftfy are installed; lumina-jax depends on neither, so this is diffusers' behaviour
        without them."""
        if system_prompt is not None:
            raise ValueError("system_prompt is Lumina-Image 2.0's (Gemma-2); Lumina-Next's captions have none")
        return [t.lower().strip() for t in texts]

    def training_captions(self, texts: list[str]) -> list[str]:
        """As at sampling time: the cache encodes them as the pipeline does."""
        return self.prepare_captions(texts)

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


class GemmaEncoder(DecoderEncoder):
    """Gemma as Lumina-Next's text encoder: token ids -> the features of hidden_states[-2] (`DecoderEncoder`)."""

    decoder_layer = GemmaDecoderLayer
    takes_last_hidden_state = False
