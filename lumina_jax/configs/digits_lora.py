"""A LoRA that teaches the shipped digits model (lumina_jax/assets/lumina-next-digits) to mirror-write.

The model draws digits as scikit-learn's writers did; this recipe fine-tunes rank-8 adapters on its attention,
feed-forward and adaLN layers with the same captions over the 1,797 digits flipped left to right, the
transformer frozen. Produces out/digits-lora/lora/pytorch_lora_weights.safetensors, a PEFT LoRA file:

    python -m train --config digits_lora
    python -m train eval --mirrored                                   # the shipped model, read mirrored
    python -m train eval --mirrored --lora out/digits-lora/lora       # with the adapter

`eval --mirrored` flips the drawn digits back before the classifier reads them: mirror-written digits
score as well as the shipped model's plain ones do unflipped, plain ones poorly. Needs scikit-learn.
"""

from lumina_jax.assets import DIGITS_MODEL
from lumina_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        workdir="out/digits-lora",
        pipeline=str(DIGITS_MODEL),
        data="out/digits-lora/data/captions.jsonl",  # written by prepare: the digits, mirrored
        cache="out/digits-lora/cache",
        prepare="lumina_jax.training.digits:prepare_mirrored",
        init="pretrained",
        lora_rank=8,
        lora_targets=["attention", "feed_forward", "modulation"],
        image_size=32,
        max_aspect=1.0,
        batch_size=64,
        steps=600,
        lr=3e-3,
        warmup_steps=50,
        ema_decay=0.99,
        compute_dtype="float32",
        save_every=200,
        log_every=50,
    )
