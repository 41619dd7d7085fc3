"""lumina-train --config CONFIG [field=value ...]   train (resumes from the newest checkpoint)
lumina-train cache --config CONFIG [field=value ...]   encode the config's manifest into its cache
lumina-train export --config CONFIG [--step N] [--out PATH] [--overwrite]   EMA weights, a pipeline (LoRA: a file)
lumina-train eval [--model PATH] [--lora FILE] [--mirrored] [--samples-per-digit N]   score a digits model

CONFIG is a name from lumina_jax/configs/ (e.g. digits) or a path to a Python file defining get_config().
A run resumes from the newest checkpoint in its workdir. One already at `steps` has nothing to train:
it says so and exports its pipeline again (exit 0); one past `steps` is an error (exit 2).
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lumina_jax.cli import fail, use_compilation_cache

COMMANDS = ("cache", "export", "eval")
# transformers' notice that PyTorch is missing speaks to users of its models; we use its tokenizers only.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, 1 or more")
    return int(text)


def parse(argv: list[str], prog: str) -> argparse.Namespace:
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    rest = argv[1:] if command != "train" else argv
    parser = argparse.ArgumentParser(
        prog=prog if command == "train" else f"{prog} {command}",
        description=__doc__.replace("lumina-train", prog),  # the usage lines as the user calls the command
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command == "eval":
        from lumina_jax.assets import DIGITS_MODEL

        parser.add_argument("--model", default=str(DIGITS_MODEL), help="pipeline folder of a digits model")
        parser.add_argument("--samples-per-digit", type=positive_int, default=20)
        parser.add_argument("--steps", type=positive_int, default=30)
        parser.add_argument("--guidance", type=float, default=4.0)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--lora", help="a LoRA file (or folder holding one) merged into the model first")
        parser.add_argument("--mirrored", action="store_true", help="read the digits flipped left to right")
    else:
        parser.add_argument("--config", required=True, help="config name (lumina_jax/configs/NAME.py) or file")
        parser.add_argument("overrides", nargs="*", help="field=value, e.g. steps=500 lr=3e-4")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to the workdir)")
        if command == "train":
            plan = parser.add_argument_group("compile only: will the step fit on a Cloud TPU (no TPU, data or weights)")
            plan.add_argument(
                "--compile-only",
                action="store_true",
                help="compile the train step for --topology with the TPU compiler (pip install -e "
                "'.[tpu]'), print its memory per chip, FLOPs and the largest batch that fits; "
                "exit 1 if the config's batch does not fit",
            )
            plan.add_argument("--topology", help="the TPU slice: v5e-8, v6e-8, v5p-8, v5p-128, ... or a JAX topology")
            plan.add_argument("--json", help="write the figures to this file")
            plan.add_argument(
                "--no-batch-search",
                action="store_true",
                help="skip searching the largest batch (it compiles the step several times)",
            )
        if command == "export":
            parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
            parser.add_argument(
                "--out", default=None, help="folder to write (default: WORKDIR/pipeline; LoRA: WORKDIR/lora)"
            )
            parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    args = parser.parse_args(rest)
    args.command = command
    if getattr(args, "compile_only", False) and not args.topology:
        parser.error("--compile-only needs --topology")
    return args


def main(argv: list[str] | None = None, prog: str = "lumina-train") -> int:
    args = parse(sys.argv[1:] if argv is None else argv, prog)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("lumina_jax").setLevel(logging.INFO)  # ours; JAX's and Orbax's INFO lines are noise here
    try:
        return run(args)
    except (OSError, ValueError) as e:  # what the user gave: a missing or unwritable path, a bad value or data set
        return fail(e)


def run(args: argparse.Namespace) -> int:
    if args.command == "eval":
        from lumina_jax.pipeline import LuminaPipeline
        from lumina_jax.training.digits import evaluate_pipeline

        pipe = LuminaPipeline.from_pretrained(args.model, dtype="float32", progress=False)
        if args.lora:
            pipe.load_lora_weights(args.lora)
        result = evaluate_pipeline(
            pipe,
            samples_per_digit=args.samples_per_digit,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
            mirrored=args.mirrored,
        )
        print(json.dumps({k: v for k, v in result.items() if k != "confusion"}, indent=1))
        print("confusion (rows: prompted digit, columns: classified as):")
        for digit, row in enumerate(result["confusion"]):
            print(digit, " ".join(f"{int(n):3d}" for n in row))
        return 0

    from lumina_jax.training.config import load_config

    config = load_config(args.config, args.overrides)
    if getattr(args, "compile_only", False):
        return compile_only(config, args)
    use_compilation_cache()  # not for --compile-only: programs compiled for a TPU topology do not load here
    from lumina_jax.training import loop

    if args.command == "cache":
        loop.prepare_data(config)
        return 0
    if args.command == "export":
        out = args.out or loop.export_destination(config)
        try:
            out = loop.export_checkpoint(config, out, args.step, overwrite=args.overwrite)
        except FileExistsError as e:
            return fail(e)
        print(f"{exported(config)}: {out}")
        return 0
    try:
        summary = loop.train(config, progress=not args.no_progress)
    except loop.TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.step == summary.start_step:
        print(f"nothing to train: {config.workdir} is at step {summary.step}, steps={config.steps}")
    else:
        state = "stopped (SIGTERM or Ctrl-C), checkpoint saved" if summary.preempted else "done"
        print(f"{state}: step {summary.step} in {summary.seconds:.0f} s, {summary.skipped_steps} skipped steps")
    if summary.export:
        print(f"{exported(config)}: {summary.export}")
    return 0


def exported(config) -> str:
    return "the EMA adapters as a PEFT LoRA file" if config.lora_rank else "pipeline with the EMA weights"


def compile_only(config, args: argparse.Namespace) -> int:
    from lumina_jax import tpu
    from lumina_jax.peak_flops import PEAK_BF16_FLOPS
    from lumina_jax.training import compile_only as step_plan

    try:
        target = tpu.tpu_slice(args.topology)
        try:
            samples = step_plan.plan_samples(config, target)
        except FileNotFoundError as e:  # a from-scratch run whose `prepare` writes the pipeline
            print(f"samples not planned: {e}")
            samples = None
        plan = step_plan.plan_train_step(config, target, samples=samples)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return fail(e)
    flops, chips = plan.programs[0].flops, target.chips
    model_flops = step_plan.model_flops(config)
    print(
        f"{args.config}: {config.batch_size} images of {config.image_size} px a step, remat {config.remat}, "
        f"mesh data={config.mesh_data} fsdp={config.mesh_fsdp} tensor={config.mesh_tensor}"
    )
    print(plan.summary())
    samples_fit = None
    if samples is not None:  # beside the training state: whether drawing them is what does not fit
        sampling = max(samples.programs, key=plan.needs)
        samples_fit = plan.needs(sampling) <= target.hbm_bytes and not any(p.refused for p in samples.programs)
        print(
            f"samples every {config.sample_every} steps: {plan.needs(sampling) / tpu.GiB:.2f} GiB while "
            f"{sampling.name} runs, {'fits' if samples_fit else 'does not fit'}"
        )
    peak = PEAK_BF16_FLOPS[target.generation.device_kind] * chips
    print(
        f"step: {model_flops / 1e12:.2f} TFLOP of model FLOPs (what MFU counts), at least "
        f"{model_flops / peak * 1e3:.1f} ms at the slice's bfloat16 peak"
    )
    if flops:
        print(
            f"as compiled: {flops * chips / 1e12:.2f} TFLOP ({flops / 1e12:.3f} per chip; remat recomputation included)"
        )
    largest = None
    if not args.no_batch_search:
        print("largest batch per chip:")
        largest = step_plan.largest_per_chip_batch(config, target, log=print, samples=samples)
        print(f"largest batch that fits: {largest} per chip" if largest else "not even 1 image per chip fits")
    if args.json:
        figures = {
            "config": args.config,
            **plan.to_json(),
            "batch_size": config.batch_size,
            "model_flops_per_step": model_flops,
            "compiled_flops_per_step": flops and flops * chips,
            "largest_per_chip_batch": largest,
            "samples_fit": samples_fit,
        }
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0 if plan.fits else 1
