"""Fine-tune the released Lumina-Next-SFT (2B Next-DiT) at 1024x1024 on your own captioned images.

The original trainer's recipe: AdamW (lr 1e-4, no weight decay), gradient norm clipped to 2,
float32 master weights with bfloat16 compute, an EMA of decay 0.9999, captions dropped 10% of
the time, multi-aspect crops near 1024^2 pixels. The pipeline downloads from the hub on the first
run (into the Hugging Face cache); before it, write the data:

    # data/captions.jsonl: one {"path": "images/0001.jpg", "prompt": "..."} a line

Sized for a v5e-8 (8 images per chip: 13.75 of 15.75 GiB per chip, from the TPU compiler; FSDP over
the 8 chips, every layer rematerialised with its input kept in the host's pinned memory, 6.75 GiB a
chip, remat="offload"; "full" keeps it on the chip and fits 4). Every 500 steps it draws its sample
prompts with the EMA weights on the training mesh: the text encoder and VAE it keeps for them take 0.89
GiB a chip beside the training state (counted above), and drawing peaks at 6.21 GiB a chip. See
`python -m train --config lumina_next_sft --compile-only --topology v5e-8` for what it needs, and
override batch_size, mesh_*, remat and sample_every for other slices.
"""

from lumina_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        workdir="out/lumina-next-sft",
        pipeline="Alpha-VLLM/Lumina-Next-SFT-diffusers",
        data="data/captions.jsonl",
        cache="data/cache-lumina-next-sft",
        init="pretrained",
        image_size=1024,
        max_aspect=4.0,
        batch_size=64,
        steps=10_000,
        lr=1e-4,
        weight_decay=0.0,
        grad_clip=2.0,
        ema_decay=0.9999,
        caption_dropout=0.1,
        compute_dtype="bfloat16",
        remat="offload",
        mesh_data=1,
        mesh_fsdp=-1,
        mesh_tensor=1,
        log_every=10,
        save_every=500,
        sample_every=500,
        sample_prompts=[
            "a red fox in the snow, golden hour",
            "a bowl of ramen on a wooden table, steam rising, top view",
            "an old lighthouse on a cliff under a starry sky",
        ],
    )
