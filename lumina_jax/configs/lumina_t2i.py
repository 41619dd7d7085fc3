"""Fine-tune the released Lumina-T2I (5B Flag-DiT, LLaMA-2-7B captions) at 1024x1024 on your own captioned images.

The original trainer's recipe (lumina_t2i/exps/5B_bs512_lr1e-4_bf16_1024px_sdxlvae.sh and train.py's
defaults): AdamW (lr 1e-4, no weight decay), gradient norm clipped to 2, float32 master weights with
bfloat16 compute, an EMA of decay 0.9999, captions dropped 10% of the time. The pipeline is the folder
`python -m convert` assembles from the released parts (LLaMA-2-7B is gated: accept its licence on the
hub and set HF_TOKEN):

    python -m convert Alpha-VLLM/Lumina-T2I lumina-t2i --text-encoder meta-llama/Llama-2-7b-hf \\
        --vae stabilityai/sdxl-vae --shift 4
    # data/captions.jsonl: one {"path": "images/0001.jpg", "prompt": "..."} a line

Sized for a v5e-16 from the TPU compiler (`python -m train --config lumina_t2i --compile-only --topology
v5e-16`): the training state alone is 80 GB (float32 weights, EMA and two Adam moments of 5B parameters),
so FSDP over all 16 chips, every layer rematerialised. Captions are cut at 256 tokens (the original at 128).
It draws lumina_next_sft's sample prompts every 500 steps: with the text encoder and VAE kept for them the
step needs 14.19 of 15.75 GiB a chip (64 images a step, remat="offload"), and drawing peaks at 8.07 GiB.
"""

import dataclasses

from lumina_jax.configs import lumina_next_sft
from lumina_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
    # the same recipe as Lumina-Next's trainer (the two original trainers' defaults agree), batch and mesh included
    return dataclasses.replace(
        lumina_next_sft.get_config(),
        workdir="out/lumina-t2i",
        pipeline="lumina-t2i",
        cache="data/cache-lumina-t2i",
    )
