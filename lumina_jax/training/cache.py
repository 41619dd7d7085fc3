"""The training cache: VAE posteriors and text features of a manifest's images, computed once.

Encoding every step would spend most of the accelerator's time on the frozen VAE and Gemma, so
`build_cache` runs them once over a JSONL manifest and writes a folder:

    settings.json          what the cache was built from (a rerun must match it)
    empty_caption.npz      the text encoder's features of "" (for caption dropout)
    shard-00000.npz        per example j of the shard: mean_j, logvar_j [C, h, w], caption_j [L_j, D]
    shard-00000.json       per example: prompt, image, line, crop, latent_shape, caption_length; skipped images
    cache.json             written last: the cache is complete

Shard k holds manifest examples [k * shard_size, (k + 1) * shard_size). Every file is written under a
temporary name and renamed into place, and a shard counts as done once its JSON exists, so a rerun
after a crash keeps the finished shards and builds only the rest. The crop of example i is drawn from
(seed, i) alone, so a resumed build equals an uninterrupted one. Images that are missing or cannot be
decoded are logged with the reason, skipped and counted.

`open_cache` reads the folder back with random access for `batches.make_batches`, which samples the
posterior per batch; the stored latents are therefore the posterior (mean, log-variance), unscaled.
"""

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lumina_jax.training.data import CROP_STEP, MAX_ASPECT, Example, crop_sizes, load_image, read_manifest

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SETTINGS_FILE = "settings.json"
COMPLETE_FILE = "cache.json"
EMPTY_CAPTION_FILE = "empty_caption.npz"

# images [B, H, W, 3] in [-1, 1] -> (mean [B, C, h, w], logvar [B, C, h, w] or None for pixel space)
ImageEncoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
# prompts -> (features [B, L, D], mask [B, L])
TextEncoder = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def build_cache(
    manifest_path: str | Path,
    out_dir: str | Path,
    *,
    encode_images: ImageEncoder,
    encode_text: TextEncoder,
    image_size: int,
    crop_step: int = CROP_STEP,
    max_aspect: float = MAX_ASPECT,
    scaling_factor: float = 1.0,
    shift_factor: float = 0.0,
    shard_size: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Encode the manifest's images and captions into `out_dir` (resuming a partial build there);
    returns the cache's metadata (the contents of cache.json).

    Images are cropped as the original trainer does (`data.crop_sizes(image_size, crop_step,
    max_aspect)`) and encoded `batch_size` at a time, images of one crop size together; a shard's
    images are held in memory until it is written (64 crops of 1024^2 pixels take 0.8 GB).
    `scaling_factor` and `shift_factor` are the VAE's; they are stored and applied when batches are made.
    """
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be at least 1, got {shard_size} and {batch_size}")
    examples = read_manifest(manifest_path)
    settings = {
        "format_version": FORMAT_VERSION,
        "manifest": str(manifest_path.resolve()),
        "manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
        "manifest_examples": len(examples),
        "image_size": image_size,
        "crop_step": crop_step,
        "max_aspect": max_aspect,
        "shard_size": shard_size,
        "seed": seed,
        "scaling_factor": float(scaling_factor),
        "shift_factor": float(shift_factor),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_or_write_settings(out_dir, settings)
    if not (out_dir / EMPTY_CAPTION_FILE).exists():
        [empty] = _encode_captions(encode_text, [""], batch_size)
        _write_npz(out_dir / EMPTY_CAPTION_FILE, {"features": empty})

    sizes = crop_sizes(image_size, crop_step, max_aspect)
    num_shards = -(-len(examples) // shard_size)
    for shard in tqdm(range(num_shards), desc="cache shards", unit="shard", disable=not progress):
        if _shard_path(out_dir, shard, ".json").exists():
            continue
        start = shard * shard_size
        _build_shard(
            out_dir,
            shard,
            examples[start : start + shard_size],
            start,
            sizes,
            seed,
            encode_images,
            encode_text,
            batch_size,
        )

    shards = [json.loads(_shard_path(out_dir, k, ".json").read_text()) for k in range(num_shards)]
    skipped = [s for shard in shards for s in shard["skipped"]]
    metadata = {
        **settings,
        "shards": num_shards,
        "examples": sum(len(shard["examples"]) for shard in shards),
        "skipped": len(skipped),
        "skipped_images": skipped,
    }
    _write_json(out_dir / COMPLETE_FILE, metadata)
    logger.info(f"cache {out_dir}: {metadata['examples']} examples, {len(skipped)} images skipped")
    return metadata


def _check_or_write_settings(out_dir: Path, settings: dict) -> None:
    path = out_dir / SETTINGS_FILE
    if not path.exists():
        _write_json(path, settings)
        return
    previous = json.loads(path.read_text())
    changed = [f"{k}: {previous.get(k)!r} then, {v!r} now" for k, v in settings.items() if previous.get(k) != v]
    if changed:
        raise ValueError(
            f"{out_dir} holds a cache built with other settings ({'; '.join(changed)}); "
            "build into a new folder or delete this one"
        )


def _build_shard(out_dir, shard, examples: list[Example], start, sizes, seed, encode_images, encode_text, batch_size):
    images, kept, skipped = [], [], []
    for index, example in enumerate(examples, start=start):
        try:
            images.append(load_image(example.image, sizes, np.random.default_rng([seed, index])))
            kept.append(example)
        except Exception as e:  # PIL raises many types for bad files; one image must not end the run
            reason = f"{type(e).__name__}: {e}"
            logger.warning(f"skipping {example.image} (manifest line {example.line}): {reason}")
            skipped.append({"image": str(example.image), "line": example.line, "reason": reason})

    means, logvars = _encode_images(encode_images, images, batch_size)
    captions = _encode_captions(encode_text, [e.prompt for e in kept], batch_size)
    arrays, records = {}, []
    for j, (example, image, mean, logvar, caption) in enumerate(zip(kept, images, means, logvars, captions)):
        arrays[f"mean_{j}"], arrays[f"caption_{j}"] = mean, caption
        if logvar is not None:
            arrays[f"logvar_{j}"] = logvar
        records.append(
            {
                "prompt": example.prompt,
                "image": str(example.image),
                "line": example.line,
                "crop": list(image.shape[:2]),
                "latent_shape": list(mean.shape),
                "caption_length": len(caption),
            }
        )
    _write_npz(_shard_path(out_dir, shard, ".npz"), arrays)
    _write_json(_shard_path(out_dir, shard, ".json"), {"shard": shard, "examples": records, "skipped": skipped})


def _encode_images(encode_images: ImageEncoder, images: list[np.ndarray], batch_size: int):
    """(means, logvars): per image, [C, h, w] float32 arrays (logvars None in pixel space)."""
    means, logvars = [None] * len(images), [None] * len(images)
    by_shape = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for shape, members in by_shape.items():
        for first in range(0, len(members), batch_size):
            batch = members[first : first + batch_size]
            mean, logvar = encode_images(np.stack([images[i] for i in batch]))
            mean = np.asarray(mean, np.float32)
            if mean.ndim != 4 or len(mean) != len(batch):
                raise ValueError(
                    f"encode_images gave mean {mean.shape} for {len(batch)} images {shape}; "
                    "expected [batch, channels, height, width]"
                )
            if logvar is not None:
                logvar = np.asarray(logvar, np.float32)
                if logvar.shape != mean.shape:
                    raise ValueError(f"encode_images gave logvar {logvar.shape}, unlike mean {mean.shape}")
            for k, i in enumerate(batch):
                means[i] = mean[k]
                logvars[i] = None if logvar is None else logvar[k]
    return means, logvars


def _encode_captions(encode_text: TextEncoder, prompts: list[str], batch_size: int) -> list[np.ndarray]:
    """Per prompt, its features [tokens, D] float32, padding dropped."""
    captions = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        features, mask = encode_text(batch)
        features, mask = np.asarray(features, np.float32), np.asarray(mask).astype(bool)
        if features.ndim != 3 or mask.shape != features.shape[:2] or len(features) != len(batch):
            raise ValueError(
                f"encode_text gave features {features.shape} and mask {mask.shape} for "
                f"{len(batch)} prompts; expected [batch, length, dim] and [batch, length]"
            )
        captions.extend(f[m] for f, m in zip(features, mask))
    return captions


def _shard_path(out_dir: Path, shard: int, suffix: str) -> Path:
    return out_dir / f"shard-{shard:05d}{suffix}"


def _write_atomic(path: Path, write: Callable) -> None:
    """Write through `write(file)` to a temporary sibling, then rename it over `path`."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with temporary.open("wb") as f:
            write(f)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_json(path: Path, value: dict) -> None:
    _write_atomic(path, lambda f: f.write((json.dumps(value, indent=1) + "\n").encode()))


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    _write_atomic(path, lambda f: np.savez(f, **arrays))


class LatentCache:
    """Random access to a built cache: `cache[i]` is example i's {"mean", "logvar" (absent in pixel
    space), "caption"} numpy arrays and its "prompt". Safe to read from several threads."""

    def __init__(self, folder: Path, metadata: dict, records: list[dict], empty_caption: np.ndarray):
        self.folder, self.metadata, self.records = folder, metadata, records
        self.scaling_factor = metadata["scaling_factor"]
        self.shift_factor = metadata["shift_factor"]
        self.empty_caption = empty_caption  # [L_e, D]
        self.empty_caption_mask = np.ones(len(empty_caption), bool)
        self.latent_shapes = [tuple(r["latent_shape"]) for r in records]
        self.caption_lengths = np.array([r["caption_length"] for r in records], np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        j = record["position"]
        with np.load(_shard_path(self.folder, record["shard"], ".npz")) as shard:  # one open file per reader
            item = {"mean": shard[f"mean_{j}"], "caption": shard[f"caption_{j}"], "prompt": record["prompt"]}
            if f"logvar_{j}" in shard:
                item["logvar"] = shard[f"logvar_{j}"]
        return item


def open_cache(folder: str | Path) -> LatentCache:
    """The cache `build_cache` wrote to `folder`; raises FileNotFoundError if it is missing or unfinished."""
    folder = Path(folder)
    complete = folder / COMPLETE_FILE
    if not complete.exists():
        if not (folder / SETTINGS_FILE).exists():
            raise FileNotFoundError(f"{folder}: no training cache here (no {SETTINGS_FILE}); run build_cache first")
        done = len(list(folder.glob("shard-*.json")))
        raise FileNotFoundError(
            f"{folder}: the cache is incomplete ({done} shards written, no {COMPLETE_FILE}); "
            "rerun build_cache with the same arguments to finish it"
        )
    metadata = json.loads(complete.read_text())
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{complete}: format_version {metadata.get('format_version')}, expected {FORMAT_VERSION}")
    records = []
    for shard in range(metadata["shards"]):
        for path in (_shard_path(folder, shard, ".json"), _shard_path(folder, shard, ".npz")):
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing from the cache {folder}; rebuild it")
        contents = json.loads(_shard_path(folder, shard, ".json").read_text())
        records += [{**r, "shard": shard, "position": j} for j, r in enumerate(contents["examples"])]
    with np.load(folder / EMPTY_CAPTION_FILE) as empty:
        empty_caption = empty["features"]
    return LatentCache(folder, metadata, records, empty_caption)


def pipeline_encoders(pipe, pixel_channels: int = 3) -> tuple[ImageEncoder, TextEncoder, float, float]:
    """(encode_images, encode_text, scaling_factor, shift_factor) for `build_cache`, from a
    `LuminaPipeline`: its VAE's posterior (jitted; pixel space when `pipe.vae` is None, in grey when
    pixel_channels is 1) and `pipe.encode_prompt` (cleaning and tokenising as at sampling time)."""
    import jax  # here: the cache reader and the tests' numpy encoders need no JAX
    from flax import nnx

    def encode_text(prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        features, mask, _, _ = pipe.encode_prompt(list(prompts), None)
        return np.asarray(features, np.float32), np.asarray(mask, bool)

    if pipe.vae is None:
        if pixel_channels not in (1, 3):
            raise ValueError(f"a pixel-space model has 1 (grey) or 3 (RGB) channels, got {pixel_channels}")
        return (_pixel_space if pixel_channels == 3 else _grey_pixel_space), encode_text, 1.0, 0.0

    graphdef, params = nnx.split(pipe.vae)
    encode = jax.jit(lambda params, images: nnx.merge(graphdef, params).encode(images))

    def encode_images(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Pad the batch to a power of two: a few compiled programs per crop size, not one per batch size.
        count = len(images)
        padded = np.concatenate([images, np.repeat(images[-1:], (1 << (count - 1).bit_length()) - count, axis=0)])
        mean, logvar = encode(params, padded.transpose(0, 3, 1, 2))  # the VAE reads [B, 3, H, W]
        return np.asarray(mean[:count]), np.asarray(logvar[:count])

    config = pipe.vae.config
    return encode_images, encode_text, config.scaling_factor, config.shift_factor or 0.0


def _pixel_space(images: np.ndarray) -> tuple[np.ndarray, None]:
    return images.transpose(0, 3, 1, 2), None


def _grey_pixel_space(images: np.ndarray) -> tuple[np.ndarray, None]:
    return images.mean(axis=-1, keepdims=True).transpose(0, 3, 1, 2), None
