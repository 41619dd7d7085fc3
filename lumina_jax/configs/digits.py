"""The out-of-the-box demo model: a small pixel-space Next-DiT on scikit-learn's handwritten digits.

Produces out/digits/pipeline/, a Lumina pipeline folder (diffusers layout, no VAE: 32x32 grey pixels)
with a tiny random-weight Gemma text encoder and a word-level tokenizer. The shipped copy is
lumina_jax/assets/lumina-next-digits/. Needs scikit-learn: pip install -e ".[digits]".
"""

from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.training.config import TrainConfig
from lumina_jax.training.digits import DIGIT_WORDS


def get_config() -> TrainConfig:
    return TrainConfig(
        workdir="out/digits",
        pipeline="out/digits/base",  # written by prepare: text encoder, tokenizer, scheduler
        data="out/digits/data/captions.jsonl",  # written by prepare: 1,797 PNGs with varied captions
        cache="out/digits/cache",
        prepare="lumina_jax.training.digits:prepare",
        init="scratch",
        # 32x32 grey pixels in 8x8 patches: 16 tokens, as many as the 8x8 source digits have 2x2 blocks.
        # A token's 64 values fit the 128 wide model: a velocity target carries the noise of every pixel,
        # and RGB patches (192 values) would not fit through it.
        transformer=NextDiTConfig(
            sample_size=32,
            patch_size=8,
            in_channels=1,
            hidden_size=128,
            num_layers=4,
            num_attention_heads=4,
            num_kv_heads=2,
            multiple_of=32,
            learn_sigma=False,
            cross_attention_dim=64,
        ),
        image_size=32,
        max_aspect=1.0,
        batch_size=64,
        steps=3000,
        lr=1e-3,
        warmup_steps=100,
        lr_decay="cosine",
        ema_decay=0.995,
        compute_dtype="float32",
        save_every=500,
        log_every=50,
        sample_every=500,
        sample_prompts=[f"a handwritten digit {name}" for name in DIGIT_WORDS],
    )
