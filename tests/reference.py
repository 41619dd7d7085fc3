"""PyTorch references for the parity tests: diffusers modules with every parameter randomised."""

import numpy as np
import torch
from diffusers import LuminaNextDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2^2), gates,
    pad tokens and biases ~ N(0, 0.5^2) or so, so no zero-initialised path goes untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:
                value = noise * param.shape[1] ** -0.5
            elif "norm" in name and name.endswith("weight"):
                value = 1 + 0.2 * noise
            elif name.endswith("gate") or name == "pad_token":
                value = noise
            else:
                value = 0.3 * noise
            param.copy_(value.to(param.dtype))
    return module


def random_transformer(seed: int = 0, **config) -> LuminaNextDiT2DModel:
    """A randomised transformer whose two copies of the shared query (attn1/attn2 to_q and norm_q)
    are equal, as in the released weights, where the original model has a single query."""
    model = randomize_(LuminaNextDiT2DModel(**config).eval(), seed)
    with torch.no_grad():
        for block in model.layers:
            block.attn2.to_q.load_state_dict(block.attn1.to_q.state_dict())
            block.attn2.norm_q.load_state_dict(block.attn1.norm_q.state_dict())
    return model


def transformer_forward(model, x, t, caption, mask, *, linear_factor=1.0, ntk_factor=1.0, base_sequence_length=None):
    """diffusers' transformer as its pipeline calls it, numpy in and out (float32)."""
    rope = get_2d_rotary_pos_embed_lumina(model.head_dim, 384, 384, linear_factor=linear_factor, ntk_factor=ntk_factor)
    kwargs = {} if base_sequence_length is None else {"base_sequence_length": base_sequence_length}
    with torch.no_grad():
        out = model(
            torch.from_numpy(np.asarray(x, np.float32)),
            torch.from_numpy(np.asarray(t, np.float32)),
            torch.from_numpy(np.asarray(caption, np.float32)),
            torch.from_numpy(np.asarray(mask)),
            image_rotary_emb=rope,
            cross_attention_kwargs=kwargs,
            return_dict=False,
        )[0]
    return out.float().numpy()


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def inputs(seed: int, batch: int, height: int, width: int, caption_len: int, caption_dim: int, valid: list[int]):
    """Latents, timesteps in (0, 1), caption features and a right-padded caption mask."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, height, width), dtype=np.float32)
    t = rng.uniform(0.05, 0.95, batch).astype(np.float32)
    caption = rng.standard_normal((batch, caption_len, caption_dim), dtype=np.float32)
    mask = (np.arange(caption_len)[None] < np.asarray(valid)[:, None]).astype(np.int64)
    return x, t, caption, mask
