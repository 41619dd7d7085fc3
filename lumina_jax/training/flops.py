"""Model FLOPs of a training step, from the architecture, as MaxText counts them for MFU.

Every matmul counts 2 x m x n x k, the backward pass twice the forward (the gradients of its input
and of its weights), so a step is 3 forward passes: MaxText's 6 x parameters x tokens for the weights,
plus attention's scores and mixing, 12 x layers x heads x head_dim x queries x keys, over the image
tokens and the caption tokens of the batch's shapes (padding included: it is computed). What a remat
policy recomputes is not counted, nor the elementwise work (norms, softmax, RoPE, the optimizer):
MFU compares useful matmul work with the chip's peak matrix rate.
"""

from lumina_jax.models.dit_blocks import TIMESTEP_FEATURES
from lumina_jax.models.family import TransformerConfig


def forward_flops(cfg: TransformerConfig, image_tokens: int, caption_tokens: int) -> float:
    """One sample's forward pass through the transformer (Next-DiT or Flag-DiT): its matmul FLOPs."""
    d, cond, t, caption = cfg.hidden_size, cfg.cond_dim, image_tokens, caption_tokens
    heads, kv = cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    queries = cfg.query_projections * heads
    per_layer = (
        cond * cfg.block_modulations * d  # the modulation, once a sample
        + t * d * (queries + 2 * kv)  # queries, keys and values of the image tokens
        + caption * cfg.cross_attention_dim * 2 * kv  # keys and values of the caption
        + 2 * t * (t + caption) * heads  # scores and mixing: every query against image and caption keys
        + t * heads * d  # the output projection
        + 3 * t * d * cfg.ffn_dim  # SwiGLU
    )
    patch = cfg.patch_size**2
    outside = (
        t * patch * cfg.in_channels * d  # the patch embedding
        + (TIMESTEP_FEATURES + cond + cfg.cross_attention_dim) * cond  # timestep and caption conditioning
        + cond * cfg.final_modulations * d  # the final modulation
        + t * d * patch * cfg.out_channels  # the final linear layer
    )
    return 2 * (cfg.num_layers * per_layer + outside)


def train_step_flops(cfg: TransformerConfig, batch: int, image_tokens: int, caption_tokens: int) -> float:
    """A training step's model FLOPs for a batch of `batch` sequences of these lengths: forward and backward."""
    return 3 * batch * forward_flops(cfg, image_tokens, caption_tokens)
