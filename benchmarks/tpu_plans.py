"""The README's fit table: the released configuration compiled for Cloud TPU slices by the TPU
compiler, on this machine (no TPU, no weights), through the same code as the two `--compile-only`
commands. Slow on a small CPU (the released decoder and train step take minutes each to compile).

    python benchmarks/tpu_plans.py --json out/tpu_plans.json [--only sample|train] [--model NAME] [--config NAME]
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

from lumina_jax import tpu
from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.sharding import make_mesh
from lumina_jax.training.compile_only import largest_per_chip_batch, model_flops, plan_train_step
from lumina_jax.training.config import apply_overrides, load_config

# (released pipeline, slice, height = width, images), one chip each; 30 steps with CFG, bfloat16 transformer
# and text encoder, the VAE in the dtype its config asks for. Each is planned with every model resident, and
# with the text encoder offloaded to the host between prompts (--offload-text-encoder).
SAMPLING = [
    ("lumina-next-sft", "v5e-1", 1024, 1),
    ("lumina-next-sft", "v5e-1", 2048, 1),
    ("lumina-image-2.0", "v5e-1", 1024, 1),
    ("lumina-image-2.0", "v5e-1", 2048, 1),
]
# (config in lumina_jax/configs/, slice, its overrides, whether to search the largest batch)
TRAINING = [
    ("lumina_next_sft", "v5e-8", ["batch_size=64"], True),
    ("lumina_next_sft", "v6e-8", ["batch_size=128"], True),
    ("lumina_next_sft", "v5e-8", ["batch_size=32", "remat=full"], True),
    ("lumina_next_sft", "v6e-8", ["batch_size=80", "remat=full"], True),
    ("lumina_next_sft", "v5p-8", ["batch_size=64", "remat=full"], True),
    ("lumina_next_sft", "v5e-8", ["batch_size=64", "remat=attention_ffn"], False),
    ("lumina_next_sft", "v5e-8", ["batch_size=64", "remat=dots"], False),
    ("lumina_next_sft", "v5p-128", ["batch_size=128", "mesh_data=4", "mesh_fsdp=4", "mesh_tensor=4"], False),
    ("lumina_next_sft", "v5e-1", ["batch_size=1"], True),
    ("lumina_next_sft", "v6e-1", ["batch_size=1"], True),
    ("lumina_next_sft", "v5e-4", ["batch_size=4"], True),
    ("lumina_next_sft_lora", "v5e-1", [], True),
    ("lumina_next_sft_lora", "v6e-1", [], True),
    ("lumina_next_sft_lora", "v5e-4", ["batch_size=64"], True),
    ("lumina_image_2", "v5e-8", [], True),
    ("lumina_image_2", "v5e-8", ["batch_size=16", "remat=full"], True),
]


def sampling_rows(only: str | None, log) -> list[dict]:
    rows = []
    for model, name, size, images in SAMPLING:
        if only not in (None, model):
            continue
        started = time.perf_counter()
        target = tpu.tpu_slice(name)
        pipe = LuminaPipeline.abstract(model).shard(make_mesh(fsdp=1, devices=tpu.compile_devices(target)))
        programs = pipe.lower(height=size, width=size, num_images_per_prompt=images)
        models = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
        plan = tpu.plan_programs(target, programs, models, log=log)
        offloaded = dataclasses.replace(plan, resident={k: v for k, v in plan.resident.items() if k != "text_encoder"})
        command = (
            f"python -m sample --compile-only --topology {name} --model {model} --height {size} "
            f"--width {size} --num-images {images}"
        )
        for variant, flag in ((plan, ""), (offloaded, " --offload-text-encoder")):
            log(variant.summary())
            rows.append({"command": command + flag, "seconds": time.perf_counter() - started, **variant.to_json()})
    return rows


def training_rows(only: str | None, log) -> list[dict]:
    rows = []
    for config_name, name, overrides, search in TRAINING:
        if only not in (None, config_name):
            continue
        started = time.perf_counter()
        target = tpu.tpu_slice(name)
        config = apply_overrides(load_config(config_name), overrides)
        plan = plan_train_step(config, target)
        log(plan.summary())
        largest = largest_per_chip_batch(config, target, log=log) if search else None
        flops = plan.programs[0].flops
        rows.append(
            {
                "command": f"python -m train --config {config_name} {' '.join(overrides)} --compile-only "
                f"--topology {name}",
                "remat": config.remat,
                "batch_size": config.batch_size,
                "largest_per_chip_batch": largest,
                "model_flops_per_step": model_flops(config),
                "compiled_flops_per_step": flops and flops * target.chips,
                "seconds": time.perf_counter() - started,
                **plan.to_json(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("out/tpu_plans.json"))
    parser.add_argument("--only", choices=["sample", "train"])
    parser.add_argument("--model", help="only the sampling rows of this released pipeline (e.g. lumina-image-2.0)")
    parser.add_argument("--config", help="only the training rows of this config (e.g. lumina_image_2)")
    args = parser.parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.only != "train":
        results["sample"] = sampling_rows(args.model, lambda line: print(line, flush=True))
    if args.only != "sample":
        results["train"] = training_rows(args.config, lambda line: print(line, flush=True))
    args.json.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
