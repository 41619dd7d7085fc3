"""The Gemma-2 text encoder of Lumina-Image 2.0, in Flax NNX.

Computes what both references take from `transformers.Gemma2Model` (diffusers' Lumina2Pipeline and the
original sample.py, each `output_hidden_states=True`): `hidden_states[-2]`, the output of decoder layer
num_hidden_layers - 2, before the final norm. So only the first num_hidden_layers - 1 layers run; the last
layer and the final norm are still parameters, so a released checkpoint imports strictly and exports whole.

Gemma-2 differs from Gemma in its layers: norms after attention and after the MLP as well as before,
attention scaled by query_pre_attn_scalar**-0.5 with its logits soft-capped (cap * tanh(logits / cap))
before the mask, and layers alternating between a sliding window (a query sees its `sliding_window` latest
tokens, itself included) and the whole causal past, as layer_types says. Inputs are the tokenizer's
right-padded input_ids and attention_mask; positions are 0..L-1 whatever the padding.
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
    GemmaRMSNorm,
    causal_inputs,
    check_decoder_sizes,
    gelu_tanh,
    transformers_config,
)
from lumina_jax.models.layers import Dtype

LAYER_TYPES = ("full_attention", "sliding_attention")  # a layer's index into `Gemma2Encoder.layer_inputs`' masks

# The original's named system prompts (Lumina-Image-2.0 sample.py --system_type; "real" is its default and
# diffusers' Lumina2Pipeline.system_prompt), each followed by " <Prompt Start> " and the caption.
SYSTEM_PROMPTS = {
    "real": "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts.",
    "align": "You are an assistant designed to generate high-quality images with the highest degree of image-text "
    "alignment based on textual prompts.",
    "base": "You are an assistant designed to generate high-quality images based on user prompts.",
    "aesthetics": "You are an assistant designed to generate high-quality images with highest degree of aesthetics "
    "based on user prompts.",
    "4grid": "You are an assistant designed to generate four high-quality images with highest degree of aesthetics "
    "arranged in 2x2 grids based on user prompts.",
}
PROMPT_START = " <Prompt Start> "


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """Architecture, with the field names of transformers' Gemma-2 config.json; defaults are gemma-2-2b's.

    final_logit_softcapping caps the causal LM's logits, which no encoder computes; it, hidden_act (which
    transformers' Gemma-2 does not read: hidden_activation chooses the MLP's activation),
    max_position_embeddings and pad_token_id change no numbers and are kept so a converted folder says what
    it holds.
    """

    # negative prompts cut to their prompt's length: diffusers' Lumina2Pipeline pads each to 256 tokens on its own
    negatives_cut_to_prompts: ClassVar[bool] = False

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_activation: str = "gelu_pytorch_tanh"
    hidden_act: str | None = None
    attention_bias: bool = False
    pad_token_id: int | None = 0
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None  # transformers' default: sliding first, then alternating
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0

    def __post_init__(self):
        if self.layer_types is None:
            default = tuple(LAYER_TYPES[(i + 1) % 2] for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", default)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # hashable, as a config.json list is not
        check_decoder_sizes(self)
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(
                f"only Gemma-2's tanh-approximated GELU is supported (hidden_activation 'gelu_pytorch_tanh'); "
                f"got {self.hidden_activation!r}"
            )
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(
                f"layer_types must name {self.num_hidden_layers} layers, each one of {list(LAYER_TYPES)}; "
                f"got {list(self.layer_types)}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {self.sliding_window}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Gemma2Config":
        """Read transformers' config.json (`models.decoder.transformers_config`); the first releases' files
        also carry sliding_window_size, the same number as sliding_window."""
        values = dict(values)
        size = values.pop("sliding_window_size", values.get("sliding_window"))
        if size != values.get("sliding_window"):
            raise ValueError(f"sliding_window_size {size} contradicts sliding_window {values.get('sliding_window')}")
        return transformers_config(cls, values, "gemma2", "Gemma-2")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {
            "architectures": ["Gemma2Model"],
            "model_type": "gemma2",
            **values,
            "layer_types": list(values["layer_types"]),
        }

    def prepare_captions(self, texts: list[str], system_prompt: str | None = None) -> list[str]:
        """Each caption after the system prompt (default: the original's --system_type real, diffusers'
        default), as diffusers' Lumina2Pipeline and the original write it; as typed otherwise (neither cleans
        nor lower-cases)."""
        system_prompt = SYSTEM_PROMPTS["real"] if system_prompt is None else system_prompt
        return [system_prompt + PROMPT_START + t for t in texts]

    def training_captions(self, texts: list[str]) -> list[str]:
        """After the original trainer's system prompt for {"path", "prompt"} items (finetune.py's "base"); the
        empty caption bare, as its caption dropout feeds it (and so any empty caption: the original would
        prepend the system prompt to an item whose caption is empty, which caption dropout alone leaves bare)."""
        return [t and SYSTEM_PROMPTS["base"] + PROMPT_START + t for t in texts]

    def load_tokenizer(self, folder):
        """Gemma-2's tokenizer padding on the right, as both references set it (its own default is the left)."""
        from transformers import AutoTokenizer  # here, not at import: transformers takes seconds to import

        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.padding_side = "right"
        return tokenizer


GEMMA_2_2B = Gemma2Config()


class SoftcappedSelfAttention(CausalSelfAttention):
    """Gemma-2's attention: logits scaled by query_pre_attn_scalar**-0.5, then soft-capped, then masked,
    as transformers' eager attention computes it (Gemma-2 has no SDPA path: SDPA cannot cap)."""

    def __init__(self, cfg: Gemma2Config, **options):
        super().__init__(cfg, **options)
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_logit_softcapping

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        groups = self.num_heads // self.num_kv_heads  # query head h reads key-value head h // groups
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.scale
        if self.softcap is not None:
            logits = self.softcap * jnp.tanh(logits / self.softcap)
        # Eager attention adds the dtype's minimum where masked: a query with no key to attend to (an
        # all-padding row, left padding) averages every value, and so does this.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class Gemma2DecoderLayer(nnx.Module):
    """Attention and MLP, each between a pre-norm and a post-norm, added to the float32 residual stream."""

    def __init__(self, cfg: Gemma2Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)
        self.self_attn = SoftcappedSelfAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)
        self.mlp = GatedMLP(cfg, gelu_tanh, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, **norm)

    def __call__(self, x, masks, cos, sin, layer_type):
        """masks [2, B, 1, L, L] (full, sliding); layer_type this layer's index into them."""
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), masks[layer_type], cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Encoder(DecoderEncoder):
    """Gemma-2 as Lumina-Image 2.0's text encoder: token ids -> the features of hidden_states[-2]
    (`DecoderEncoder`)."""

    decoder_layer = Gemma2DecoderLayer
    takes_last_hidden_state = False

    def layer_inputs(self, attention_mask: jax.Array) -> tuple[tuple, tuple]:
        """Both masks, stacked as LAYER_TYPES orders them, and the RoPE tables for every layer; each layer's
        index into the masks for itself."""
        full, cos, sin = causal_inputs(attention_mask, self.config)
        length = attention_mask.shape[1]
        window = self.config.sliding_window or length
        offsets = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
        masks = jnp.stack([full, full & (offsets < window)])
        layer_types = jnp.asarray([LAYER_TYPES.index(t) for t in self.config.layer_types], jnp.int32)
        return (masks, cos, sin), (layer_types,)
