"""LoRA on the released Lumina-Next-SFT (2B Next-DiT) at 1024x1024, on one TPU chip.

The fine-tuning recipe of lumina_next_sft.py, but only rank-16 adapters on every attention projection
train (lr 1e-4, as diffusers' LoRA scripts); the transformer stays frozen in bfloat16 (3.15 GiB, held once),
and the optimizer keeps the adapters' moments alone. Sized for a v5e-1: 16 images a step, 15.17 of 15.75 GiB
from the TPU compiler with remat="offload" (13.5 GiB of the host's pinned memory); a v6e-1 and a v5e-4 take
more (`python -m train --config lumina_next_sft_lora --compile-only --topology v5e-1`). The run writes
out/lumina-next-sft-lora/lora/pytorch_lora_weights.safetensors, a PEFT LoRA file in diffusers' names:

    python -m sample --model Alpha-VLLM/Lumina-Next-SFT-diffusers --lora out/lumina-next-sft-lora/lora --prompt "..."

It draws no samples while training: the text encoder and VAE kept for them would add 4.98 GiB to the chip
(20.57 GiB at 16 images, from the compiler); with sample_every, lower batch_size until --compile-only fits.
"""

import dataclasses

from lumina_jax.configs import lumina_next_sft
from lumina_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
    return dataclasses.replace(
        lumina_next_sft.get_config(),
        workdir="out/lumina-next-sft-lora",
        lora_rank=16,
        lora_targets=["attention"],
        batch_size=16,
        ema_decay=0.999,  # a LoRA run is short: the EMA follows its last thousand steps
        sample_every=0,
    )
