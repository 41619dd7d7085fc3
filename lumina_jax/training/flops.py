"""Model FLOPs of a training step, from the architecture, as MaxText counts them for MFU.

Every matmul counts 2 x m x n x k, the backward pass twice the forward (the gradients of its input
and of its weights), so a step is 3 forward passes: MaxText's 6 x parameters x tokens for the weights,
plus attention's scores and mixing, over the image tokens and the caption tokens of the batch's shapes
(padding included: it is computed). Each family counts its own forward pass (`TransformerConfig.
forward_flops`). What a remat policy recomputes is not counted, nor the elementwise work (norms, softmax,
RoPE, the optimizer): MFU compares useful matmul work with the chip's peak matrix rate.
"""

from lumina_jax.models.family import TransformerConfig


def train_step_flops(
    cfg: TransformerConfig, batch: int, image_tokens: int, caption_tokens: int, pooled_image_tokens: int = 0
) -> float:
    """A training step's model FLOPs for a batch of `batch` sequences of these lengths, and of the pooled
    latents' sequences (`pooled_image_tokens`, 0: no pooled loss): forward and backward."""
    forward = cfg.forward_flops(image_tokens, caption_tokens)
    if pooled_image_tokens:
        forward += cfg.forward_flops(pooled_image_tokens, caption_tokens)
    return 3 * batch * forward
