"""python -m convert SRC DST [--dtype float32|bfloat16] [--ema] [--transformer-only] [--revision REV] [--overwrite]"""

import argparse
import sys
import time

from lumina_jax import hub
from lumina_jax.weights.convert import convert_pipeline, convert_transformer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert Lumina-Next weights to lumina-jax's Orbax format: a whole diffusers pipeline folder, or "
        "Next-DiT weights alone (a diffusers transformer folder, an original Lumina-Next checkpoint folder or file).",
    )
    parser.add_argument("source", help="folder or checkpoint file with the PyTorch weights, or a Hugging Face hub id")
    parser.add_argument("destination", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="stored parameter dtype")
    parser.add_argument("--ema", action="store_true", help="original layout: take consolidated_ema.00-of-01")
    parser.add_argument("--transformer-only", action="store_true", help="from a pipeline folder, convert Next-DiT only")
    parser.add_argument("--revision", help="hub id: the branch, tag or commit to download (default: main)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        kind = "transformer" if args.transformer_only else "pipeline_or_transformer"
        source = hub.local_path(args.source, kind, revision=args.revision, ema=args.ema)
        options = dict(dtype=args.dtype, overwrite=args.overwrite)
        if (source / "model_index.json").exists() and not args.transformer_only:
            out = convert_pipeline(source, args.destination, **options)
        else:
            out = convert_transformer(source, args.destination, ema=args.ema, **options)
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
