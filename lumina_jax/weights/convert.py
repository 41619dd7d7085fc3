"""`python -m convert`: released weights -> our Orbax folders, ready for a sharded restore.

A pipeline folder converts whole (transformer, text encoder, VAE, with the tokenizer and scheduler
copied); a pipeline can also be assembled from separately released parts (Lumina-T2I: the Flag-DiT
checkpoint, LLaMA-2-7B with its tokenizer, the SDXL VAE); anything else is taken as transformer weights.
"""

import json
import shutil
from pathlib import Path

from lumina_jax import hub
from lumina_jax.weights import importer, orbax_io
from lumina_jax.weights.nextdit import MODELS, convert_transformer, find_checkpoint
from lumina_jax.weights.text_encoder import text_encoder_family
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
    """Convert a Lumina pipeline folder (diffusers' Lumina-Next, or Lumina-T2I's); the VAE stays float32
    when its config forces upcasting. A pixel-space pipeline (model_index.json names no VAE) converts
    without one; a pipeline without scheduler/ without one."""
    source = Path(source)
    vae = importer.has_vae(source)
    needed = ("transformer", "text_encoder", *(("vae",) if vae else ()), "model_index.json", "tokenizer")
    missing = [name for name in needed if not (source / name).exists()]
    if missing:
        raise ValueError(f"{source}: a Lumina pipeline folder needs {', '.join(missing)}")
    with orbax_io.atomic_folder(destination, overwrite=overwrite, keep=(source,)) as folder:
        options = dict(dtype=dtype, progress=progress)
        convert_transformer(source / "transformer", folder / "transformer", **options)
        text_encoder_family(source / "text_encoder").convert(
            source / "text_encoder", folder / "text_encoder", **options
        )
        if vae:
            convert_vae(source / "vae", folder / "vae", **options)
        for name in PIPELINE_FILES:
            if (source / name).exists():
                copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
                copy(source / name, folder / name)
    return Path(destination)


def assemble_pipeline(
    transformer: str | Path,
    text_encoder: str | Path,
    vae: str | Path,
    destination: str | Path,
    *,
    shift: float | None = None,
    ema: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """A converted pipeline folder from separately released parts, each a folder or a hub id: transformer
    weights (any layout; `ema` picks an original checkpoint's EMA weights), a text encoder with its
    tokenizer (a transformers model folder, such as meta-llama/Llama-2-7b-hf's, or a pipeline), and a VAE.
    `shift`, if given, is written as the scheduler's time shift (else the pipeline's family default applies)."""
    transformer = hub.local_path(transformer, "transformer", ema=ema)
    tokenizer = hub.local_path(text_encoder, "tokenizer")
    text_encoder = hub.local_path(text_encoder, "text_encoder")
    vae = hub.local_path(vae, "vae")
    config = find_checkpoint(transformer, ema=ema).found_config  # the family: no tensor is read
    in_pipeline = (text_encoder / "model_index.json").exists()
    encoder_folder = text_encoder / "text_encoder" if in_pipeline else text_encoder
    tokenizer = tokenizer / "tokenizer" if in_pipeline else tokenizer
    tokenizer_files = [tokenizer / name for name in hub.TOKENIZER_FILES if (tokenizer / name).is_file()]
    if not tokenizer_files:
        raise ValueError(
            f"{tokenizer}: no tokenizer beside the text encoder (expected one of {', '.join(hub.TOKENIZER_FILES)})"
        )
    parts = (transformer, text_encoder, vae, tokenizer)
    with orbax_io.atomic_folder(destination, overwrite=overwrite, keep=parts) as folder:
        options = dict(dtype=dtype, progress=progress)
        convert_transformer(transformer, folder / "transformer", ema=ema, **options)
        encoder = text_encoder_family(encoder_folder)
        encoder.convert(encoder_folder, folder / "text_encoder", **options)
        convert_vae(vae, folder / "vae", **options)
        (folder / "tokenizer").mkdir()
        for file in tokenizer_files:
            shutil.copy2(file, folder / "tokenizer" / file.name)
        scheduler = "FlowMatchEulerDiscreteScheduler"
        if shift is not None:
            (folder / "scheduler").mkdir()
            (folder / "scheduler" / "scheduler_config.json").write_text(
                json.dumps({"_class_name": scheduler, "shift": shift})
            )
        index = {
            "_class_name": config.pipeline_class,
            "transformer": ["lumina_jax", MODELS[type(config)].__name__],
            "text_encoder": ["lumina_jax", encoder.model.__name__],
            "tokenizer": ["transformers", "AutoTokenizer"],
            "vae": ["lumina_jax", "AutoencoderKL"],
            **({"scheduler": ["diffusers", scheduler]} if shift is not None else {}),
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return Path(destination)
