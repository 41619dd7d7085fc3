"""Training a Flag-DiT (Lumina-T2I's transformer) with the same objective and step as Next-DiT: its token loss
is the original trainer's image-space loss (the model's velocity for [B, C, H, W] latents, end-of-line
tokens dropped), for images of several sizes in one padded batch."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lumina_jax.models.flagdit import FlagDiT, FlagDiTConfig
from lumina_jax.training.objective import interpolate
from lumina_jax.training.step import TrainBatch, flow_loss

FLOAT32_BOUND = 1e-5
TINY_FLAG = FlagDiTConfig(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    num_layers=2,
    num_attention_heads=4,
    num_kv_heads=2,
    multiple_of=16,
    learn_sigma=True,
    qk_norm=True,
    cross_attention_dim=24,
)


def random_flag_dit(seed: int = 0) -> FlagDiT:
    """Every parameter random, the zero-initialised ones too, so every path carries signal."""
    model = nnx.eval_shape(lambda: FlagDiT(TINY_FLAG, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)

    def random_value(path, abstract):
        noise = rng.standard_normal(abstract.shape).astype(np.float32)
        return jnp.asarray(noise * abstract.shape[-2] ** -0.5 if abstract.ndim == 2 else 1 + 0.2 * noise)

    nnx.update(model, jax.tree_util.tree_map_with_path(random_value, nnx.state(model)))
    return model


def test_the_token_loss_is_the_image_space_loss_of_the_model():
    model = random_flag_dit()
    rng = np.random.default_rng(1)
    sizes = [(4, 6), (8, 4), (6, 6)]  # latents: 8, 12 and 12 tokens with end-of-line ones, the first padded
    data = [rng.standard_normal((4, h, w), np.float32) for h, w in sizes]
    noise = [rng.standard_normal((4, h, w), np.float32) for h, w in sizes]
    caption = rng.standard_normal((3, 5, 24), np.float32)
    mask = np.arange(5)[None] < np.array([[5], [2], [3]])
    t = jnp.asarray([0.2, 0.55, 0.9], jnp.float32)
    batch = TrainBatch.from_latents([jnp.asarray(x) for x in data], caption, mask, TINY_FLAG)
    noise_tokens = TrainBatch.from_latents([jnp.asarray(x) for x in noise], caption, mask, TINY_FLAG).patches
    graphdef, params = nnx.split(model)
    ours = float(flow_loss(graphdef, params, batch, t, noise_tokens, jnp.asarray(caption), jnp.asarray(mask)))

    per_image = []  # as the original trainer: the model on each image, its first in_channels, mean squared error
    for i, (x1, x0) in enumerate(zip(data, noise)):
        xt, target = interpolate(x0[None], x1[None], t[i : i + 1])
        out = model(xt, t[i : i + 1], caption[i : i + 1], mask[i : i + 1])[:, :4]
        per_image.append(float(jnp.mean(jnp.square(out - target))))
    assert abs(ours / np.mean(per_image) - 1) <= FLOAT32_BOUND
    assert batch.positions is None and int(batch.end_of_line.sum()) == 2 + 4 + 3  # one a row
