"""Whole text-to-image time (Gemma, 30 CFG steps, VAE decode) with the released shapes and random
weights, all three models resident; first image (with compilation) and warm images, peak memory.

    python benchmarks/pipeline_gpu.py [--size 1024] [--steps 30]      # on a GPU
    python benchmarks/pipeline_gpu.py --tiny                          # a quick check of the script on CPU

The transformer step against diffusers (same weights, same run) is benchmarks/transformer_step.py.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lumina_jax import PRESETS, LuminaPipeline, NextDiT, NextDiTConfig
from lumina_jax.models.gemma import GEMMA_2B, GemmaConfig, GemmaEncoder
from lumina_jax.models.vae import SDXL_VAE, AutoencoderKL, AutoencoderKLConfig

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, dramatic light"


def tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    words = ["<pad>", "<unk>", "<bos>"] + sorted(set(PROMPT.replace(",", "").split()))
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>")


def constant_weights(make):
    """The model with every parameter 0.01: random initialisation compiles one program per shape,
    minutes for these models, and the values do not change the time."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.01, leaf.dtype), state))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        dit = NextDiTConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
                            cross_attention_dim=32, sample_size=16)  # fmt: skip
        gemma = GemmaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
        vae = AutoencoderKLConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
    else:
        dit, gemma, vae = PRESETS["NextDiT_2B_GQA_patch2"], GEMMA_2B, SDXL_VAE
    bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    start = time.perf_counter()
    pipe = LuminaPipeline(
        constant_weights(lambda: NextDiT(dit, rngs=nnx.Rngs(0), **bf16)),
        constant_weights(lambda: GemmaEncoder(gemma, rngs=nnx.Rngs(0), **bf16)),
        constant_weights(lambda: AutoencoderKL(vae, rngs=nnx.Rngs(0))),  # float32, as the pipeline runs the SDXL VAE
        tokenizer(gemma.vocab_size),
    )
    print(f"built the models in {time.perf_counter() - start:.1f} s on {jax.devices()[0].device_kind}", flush=True)
    settings = dict(prompt=PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                    guidance_scale=4.0, output_type="np")  # fmt: skip

    def image(seed):
        start = time.perf_counter()
        out = pipe(seed=seed, **settings).images
        assert out.shape == (1, args.size, args.size, 3)
        return time.perf_counter() - start

    result = {"device": jax.devices()[0].device_kind, "size": args.size, "steps": args.steps}
    result["first_image_s"] = image(0)
    result["image_s"] = statistics.median(image(seed) for seed in range(1, 1 + args.repeats))
    start = time.perf_counter()
    pipe(seed=9, **{**settings, "output_type": "latent"})
    result["denoising_only_s"] = time.perf_counter() - start
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_device_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
