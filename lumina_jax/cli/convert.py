"""lumina-convert SRC DST [--dtype float32|bfloat16] [--ema] [--transformer-only] [--text-encoder SRC --vae SRC]
[--shift S] [--revision REV] [--overwrite]"""

import argparse
import sys
import time

from lumina_jax import hub
from lumina_jax.weights.convert import assemble_pipeline, convert_pipeline, convert_transformer
from lumina_jax.weights.nextdit import find_checkpoint


def main(argv: list[str] | None = None, prog: str = "lumina-convert") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert Lumina weights to lumina-jax's Orbax format: a whole pipeline folder, transformer "
        "weights alone (Next-DiT or Flag-DiT: a diffusers transformer folder, an original Lumina-Next or Lumina-T2I "
        "checkpoint folder or file), or a pipeline assembled from parts (--text-encoder and --vae: Lumina-T2I's "
        "Flag-DiT with meta-llama/Llama-2-7b-hf and stabilityai/sdxl-vae).",
    )
    parser.add_argument("source", help="folder or checkpoint file with the PyTorch weights, or a Hugging Face hub id")
    parser.add_argument("destination", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="stored parameter dtype")
    parser.add_argument("--ema", action="store_true", help="original layout: take consolidated_ema.00-of-01")
    parser.add_argument(
        "--transformer-only", action="store_true", help="from a pipeline folder, convert its transformer only"
    )
    parser.add_argument(
        "--text-encoder", help="assemble a pipeline: the text encoder with its tokenizer (folder or hub id)"
    )
    parser.add_argument("--vae", help="assemble a pipeline: the VAE (folder or hub id)")
    parser.add_argument(
        "--shift", type=float, help="assemble a pipeline: the sampler's time shift (default: the family's)"
    )
    parser.add_argument("--revision", help="hub id: the branch, tag or commit to download (default: main)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = parser.parse_args(argv)
    assembling = args.text_encoder is not None or args.vae is not None
    if assembling and (args.text_encoder is None or args.vae is None or args.transformer_only):
        parser.error("assembling a pipeline takes both --text-encoder and --vae, and not --transformer-only")
    if assembling and args.revision is not None:
        parser.error("--revision is for one hub id; when assembling, give each part as a folder or an id at main")
    if args.shift is not None and not assembling:
        parser.error("--shift is for assembling a pipeline (with --text-encoder and --vae)")
    start = time.perf_counter()
    options = dict(dtype=args.dtype, overwrite=args.overwrite)
    try:
        if assembling:
            out = assemble_pipeline(
                args.source, args.text_encoder, args.vae, args.destination, shift=args.shift, ema=args.ema, **options
            )
        else:
            kind = "transformer" if args.transformer_only else "pipeline_or_transformer"
            source = hub.local_path(args.source, kind, revision=args.revision, ema=args.ema)
            if (source / "model_index.json").exists() and not args.transformer_only:
                out = convert_pipeline(source, args.destination, **options)
            else:
                out = convert_transformer(source, args.destination, ema=args.ema, **options)
        family = type(find_checkpoint(out / "transformer" if (out / "transformer").is_dir() else out).config)
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    found = f"{family.family_name} ({family.release})"
    print(f"wrote {out} ({args.dtype}, {found}) in {time.perf_counter() - start:.1f} s")
    return 0
