"""Fine-tune the released Lumina-Image 2.0 (2B Unified Next-DiT, Gemma-2-2B captions, FLUX VAE) at 1024x1024
on your own captioned images.

The original trainer's recipe (Lumina-Image-2.0 finetune.py as scripts/run_1024_finetune.sh runs it): AdamW
(lr 2e-4, betas 0.9 / 0.95, eps 1e-15, no weight decay), gradient norm clipped to 2, float32 master weights
with bfloat16 compute, logit-normal times shifted towards the noise by e^1.15 (its `time_shift` at 1024 px),
an EMA of decay 0.95 (its `update_ema`'s default, which it calls without one), captions dropped 10% of the
time to the bare empty caption, every other caption after its "base" system prompt (`Gemma2Config.
training_captions`). Its objective: the VAE posterior's mean (`latent_dist.mode()`), not a sample, and the
loss of every batch plus the loss of its latents average-pooled 4 x 4 (its 256-px loss), each with its own
noise and times. The pipeline downloads from the hub on the first run (into the Hugging Face cache;
Gemma-2 is gated: accept its licence and set HF_TOKEN); before it, write the data:

    # data/captions.jsonl: one {"path": "images/0001.jpg", "prompt": "..."} a line

Sized for a v5e-8 from the TPU compiler (`python -m train --config lumina_image_2 --compile-only --topology
v5e-8`): FSDP over the 8 chips, every layer rematerialised with its input kept in the host's pinned memory
(remat="offload"), 5 images per chip: 15.34 of 15.75 GiB per chip, 6.26 GiB of host memory a chip (6 need
16.17 GiB: the pooled loss's pass takes 1.47 GiB; "full" keeps the inputs on the chip and fits 2).
Left out of the recipe: the original accumulates 1,024 images a step over 32 GPUs.
"""

from lumina_jax.training.config import TrainConfig
from lumina_jax.training.objective import resolution_time_shift

IMAGE_SIZE = 1024


def get_config() -> TrainConfig:
    return TrainConfig(
        workdir="out/lumina-image-2",
        pipeline="Alpha-VLLM/Lumina-Image-2.0",
        data="data/captions.jsonl",
        cache="data/cache-lumina-image-2",
        init="pretrained",
        image_size=IMAGE_SIZE,
        max_aspect=4.0,
        batch_size=40,
        steps=10_000,
        lr=2e-4,
        adam_b1=0.9,
        adam_b2=0.95,
        adam_eps=1e-15,
        weight_decay=0.0,
        grad_clip=2.0,
        ema_decay=0.95,
        caption_dropout=0.1,
        snr_type="lognorm",
        time_shift=resolution_time_shift(IMAGE_SIZE),
        posterior="mean",
        pooled_loss_factor=4,
        compute_dtype="bfloat16",
        remat="offload",
        mesh_data=1,
        mesh_fsdp=-1,
        mesh_tensor=1,
        log_every=10,
        save_every=1000,
    )
