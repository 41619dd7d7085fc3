"""`python -m convert`: released weights -> our Orbax folders, ready for a sharded restore.

A diffusers pipeline folder converts whole (transformer, text encoder, VAE, with the tokenizer and
scheduler copied); anything else is taken as Next-DiT weights.
"""

import shutil
from pathlib import Path

from lumina_jax.weights import orbax_io
from lumina_jax.weights.gemma import convert_text_encoder
from lumina_jax.weights.importer import resolve_dtype, to_device
from lumina_jax.weights.nextdit import find_checkpoint, import_params
from lumina_jax.weights.vae import convert_vae

PIPELINE_FILES = ("model_index.json", "tokenizer", "scheduler")


def convert_transformer(
    source: str | Path,
    destination: str | Path,
    *,
    dtype: str = "float32",
    ema: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a diffusers or original Next-DiT checkpoint; returns the written folder."""
    checkpoint = find_checkpoint(source, ema=ema)
    if checkpoint.layout == "converted":
        raise ValueError(f"{source} is already in our format; load it with load_transformer")
    # Orbax copies numpy leaves while saving but not device arrays: hand it device arrays.
    params = to_device(import_params(checkpoint, resolve_dtype(dtype), progress=progress))
    return orbax_io.write_converted(destination, checkpoint.config.to_dict(), params, overwrite=overwrite)


def convert_pipeline(
    source: str | Path, destination: str | Path, *, dtype: str = "float32", overwrite: bool = False,
    progress: bool = True,
) -> Path:  # fmt: skip
    """Convert a diffusers Lumina pipeline folder; the VAE stays float32 when its config forces upcasting."""
    source = Path(source)
    missing = [name for name in ("transformer", "text_encoder", "vae", *PIPELINE_FILES) if not (source / name).exists()]
    if missing:
        raise ValueError(f"{source}: a Lumina pipeline folder needs {', '.join(missing)}")
    with orbax_io.atomic_folder(destination, overwrite=overwrite) as folder:
        convert_transformer(source / "transformer", folder / "transformer", dtype=dtype, progress=progress)
        convert_text_encoder(source / "text_encoder", folder / "text_encoder", dtype=dtype, progress=progress)
        convert_vae(source / "vae", folder / "vae", dtype=dtype, progress=progress)
        for name in PIPELINE_FILES:
            copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
            copy(source / name, folder / name)
    return Path(destination)
