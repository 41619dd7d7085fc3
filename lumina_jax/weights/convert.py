"""`python -m convert`: released weights -> our Orbax folders, ready for a sharded restore.

A diffusers pipeline folder converts whole (transformer, text encoder, VAE, with the tokenizer and
scheduler copied); anything else is taken as Next-DiT weights.
"""

import shutil
from pathlib import Path

from lumina_jax.weights import importer, orbax_io
from lumina_jax.weights.gemma import convert_text_encoder
from lumina_jax.weights.nextdit import convert_transformer
from lumina_jax.weights.vae import convert_vae

PIPELINE_FILES = ("model_index.json", "tokenizer", "scheduler")


def convert_pipeline(
    source: str | Path,
    destination: str | Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a diffusers Lumina pipeline folder; the VAE stays float32 when its config forces upcasting.

    A pixel-space pipeline (model_index.json names no VAE) converts without one."""
    source = Path(source)
    vae = importer.has_vae(source)
    needed = ("transformer", "text_encoder", *(("vae",) if vae else ()), *PIPELINE_FILES)
    missing = [name for name in needed if not (source / name).exists()]
    if missing:
        raise ValueError(f"{source}: a Lumina pipeline folder needs {', '.join(missing)}")
    with orbax_io.atomic_folder(destination, overwrite=overwrite) as folder:
        convert_transformer(source / "transformer", folder / "transformer", dtype=dtype, progress=progress)
        convert_text_encoder(source / "text_encoder", folder / "text_encoder", dtype=dtype, progress=progress)
        if vae:
            convert_vae(source / "vae", folder / "vae", dtype=dtype, progress=progress)
        for name in PIPELINE_FILES:
            copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
            copy(source / name, folder / name)
    return Path(destination)
