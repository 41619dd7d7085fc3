"""float32 models multiply in full float32 (GPUs would use TF32, TPUs bfloat16 passes); bfloat16 ones keep the default.

CPUs multiply float32 exactly either way, so this checks the programs: the precision of every
matmul and convolution that each model entry point traces.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lumina_jax import NextDiT, NextDiTConfig
from lumina_jax.models.gemma import GemmaConfig, GemmaEncoder
from lumina_jax.models.gemma2 import Gemma2Config, Gemma2Encoder
from lumina_jax.models.nextdit import patchify_padded
from lumina_jax.models.rope import rope_frequencies
from lumina_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

NEXTDIT = NextDiTConfig(
    hidden_size=32, num_layers=2, num_attention_heads=2, num_kv_heads=1, multiple_of=16, cross_attention_dim=16
)
GEMMA = GemmaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
)
GEMMA2 = Gemma2Config(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    sliding_window=4,
)
VAE = AutoencoderKLConfig(
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
MODELS = {
    "nextdit": lambda dtype: NextDiT(NEXTDIT, dtype=dtype, rngs=nnx.Rngs(0)),
    "gemma": lambda dtype: GemmaEncoder(GEMMA, dtype=dtype, rngs=nnx.Rngs(0)),
    "gemma2": lambda dtype: Gemma2Encoder(GEMMA2, dtype=dtype, rngs=nnx.Rngs(0)),
    "vae": lambda dtype: AutoencoderKL(VAE, dtype=dtype, rngs=nnx.Rngs(0)),
}
CAPTION, MASK = jnp.zeros((2, 5, 16)), jnp.ones((2, 5), bool)


def nextdit_call(model):
    return model(jnp.zeros((2, 4, 8, 8)), jnp.zeros(2), CAPTION, MASK)


def nextdit_forward_tokens(model):  # the training path
    patches, positions, token_mask = patchify_padded([jnp.zeros((4, 4, 6)), jnp.zeros((4, 8, 8))], 2)
    rope = rope_frequencies(positions, model.config.head_dim)
    return model.forward_tokens(patches, rope, token_mask, jnp.zeros(2), CAPTION, MASK)


ENTRY_POINTS = {
    "nextdit": ("nextdit", nextdit_call),
    "nextdit_forward_tokens": ("nextdit", nextdit_forward_tokens),
    "nextdit_caption_kv": ("nextdit", lambda model: model.caption_keys_values(CAPTION)),
    "gemma": ("gemma", lambda model: model(jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6), jnp.int32))),
    "gemma2": ("gemma2", lambda model: model(jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6), jnp.int32))),
    "vae_encode": ("vae", lambda model: model.encode(jnp.zeros((1, 3, 16, 16)))),
    "vae_decode": ("vae", lambda model: model.decode(jnp.zeros((1, 4, 8, 8)))),
}


def product_precisions(program: str) -> list[str]:
    """The operand precisions of every dot_general and convolution in a lowered program."""
    dots = re.findall(r"stablehlo\.dot_general .*?precision = \[(\w+), (\w+)\]", program)
    convolutions = re.findall(
        r"stablehlo\.convolution.*?precision_config = \[#stablehlo<precision (\w+)>, "
        r"#stablehlo<precision (\w+)>\]",
        program,
    )
    products = len(re.findall(r"stablehlo\.(?:dot_general|convolution)", program))
    assert len(dots) + len(convolutions) == products, "a product without a precision"
    return [p for pair in dots + convolutions for p in pair]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("dtype, expected", [(jnp.float32, "HIGHEST"), (jnp.bfloat16, "DEFAULT")])
def test_products_run_at_the_models_precision(entry, dtype, expected):
    name, run = ENTRY_POINTS[entry]
    model = nnx.eval_shape(lambda: MODELS[name](dtype))
    graphdef, state = nnx.split(model)
    program = jax.jit(lambda state: run(nnx.merge(graphdef, state))).lower(state).as_text()
    precisions = product_precisions(program)
    assert precisions and set(precisions) == {expected}


def test_precision_does_not_leak_out_of_a_float32_model():
    model = NextDiT(NEXTDIT, rngs=nnx.Rngs(0))
    nextdit_call(model)
    after = jax.jit(lambda a: a @ a).lower(jnp.asarray(np.eye(2, dtype=np.float32))).as_text()
    assert product_precisions(after) == ["DEFAULT", "DEFAULT"]
