"""Time and peak host memory of `python -m convert` on the released 2B shapes, with random weights.

    python benchmarks/convert_2b.py --workdir /tmp/convert_2b [--layout original|diffusers]

The checkpoint is written tensor by tensor from the released key/shape lists (fp32, as published),
then converted and loaded back in fresh processes, each measured for wall time and peak RSS.
"""

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KEYS = {"original": "keys_original_next_dit_2b.json", "diffusers": "keys_diffusers_transformer_2b.json"}
FILES = {"original": "consolidated.00-of-01.safetensors", "diffusers": "diffusion_pytorch_model.safetensors"}
DIFFUSERS_CONFIG = {
    "_class_name": "LuminaNextDiT2DModel",
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 4,
    "hidden_size": 2304,
    "num_layers": 24,
    "num_attention_heads": 32,
    "num_kv_heads": 8,
    "multiple_of": 256,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "learn_sigma": True,
    "qk_norm": True,
    "cross_attention_dim": 2048,
    "scaling_factor": 1.0,
}


def random_tensor(name: str, shape: list[int]) -> np.ndarray:
    # diffusers' second copy of the shared query must equal the first: seed by the attn1 name.
    seed = zlib.crc32(name.replace("attn2.to_q", "attn1.to_q").replace("attn2.norm_q", "attn1.norm_q").encode())
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.02


def write_checkpoint(folder: Path, layout: str) -> Path:
    """Stream a random fp32 safetensors file with the released keys, one tensor in memory at a time."""
    shapes = json.loads((REPO / "tests" / "fixtures" / KEYS[layout]).read_text())
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILES[layout]
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            f.write(random_tensor(name, shape).tobytes())
    if layout == "diffusers":
        (folder / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG))
    return path


def measured(args: list[str]) -> tuple[float, float]:
    """Run a fresh Python process; return (seconds, peak RSS in GB) of that process."""
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, sys.executable, *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split()
    if out[-1] != "0":
        raise SystemExit(f"{args} failed")
    return float(out[-3]), int(out[-2]) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--layout", choices=sorted(KEYS), default="original")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    source, destination = args.workdir / f"{args.layout}_src", args.workdir / f"{args.layout}_{args.dtype}"
    shutil.rmtree(destination, ignore_errors=True)
    start = time.perf_counter()
    checkpoint = write_checkpoint(source, args.layout)
    print(f"wrote {checkpoint} ({checkpoint.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")
    seconds, peak = measured(["-m", "convert", str(source), str(destination), "--dtype", args.dtype])
    size = sum(p.stat().st_size for p in destination.rglob("*") if p.is_file()) / 1e9
    print(f"convert: {seconds:.1f} s, peak RSS {peak:.2f} GB, output {size:.2f} GB")
    for name, path in (("converted", destination), (args.layout, source)):
        load = (
            f"from lumina_jax import load_transformer; load_transformer({str(path)!r}, {args.dtype!r}, progress=False)"
        )
        seconds, peak = measured(["-c", load])
        print(f"load_transformer from {name}: {seconds:.1f} s, peak RSS {peak:.2f} GB")


if __name__ == "__main__":
    main()
