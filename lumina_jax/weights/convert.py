"""`python -m convert`: released Next-DiT weights -> our Orbax folder, ready for a sharded restore."""

from pathlib import Path

from lumina_jax.weights import orbax_io
from lumina_jax.weights.importer import to_device
from lumina_jax.weights.nextdit import find_checkpoint, import_params, resolve_dtype


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
    with orbax_io.atomic_folder(destination, overwrite=overwrite) as folder:
        orbax_io.write_config(folder, checkpoint.config.to_dict())
        orbax_io.save_params(folder, params)
    return Path(destination)
