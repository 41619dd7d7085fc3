"""The training cache: VAE posteriors and text features of a data set's images, computed once.

Encoding every step would spend most of the accelerator's time on the frozen VAE and Gemma, so
`build_cache` runs them once over the examples of a data set (a JSONL manifest, a parquet data set or
an image folder: `data.read_examples`) and writes a folder:

    settings.json          what the cache was built from (a rerun must match it)
    empty_caption.npz      the text encoder's features of "" (for caption dropout)
    shard-00000.npz        per example j of the shard: mean_j, logvar_j [C, h, w], caption_j [L_j, D]
    shard-00000.json       per example: prompt, source, crop, latent_shape, caption_length; skipped images
    cache.json             written last: the cache is complete

Shard k holds examples [k * shard_size, (k + 1) * shard_size). Every file is written under a temporary
name and renamed into place (in a bucket, where an object appears whole or not at all, it is uploaded
straight to its name), and a shard counts as done once its JSON exists, so a rerun after a crash
keeps the finished shards and builds only the rest. The crop of example i is drawn from (seed, i)
alone, so a resumed build equals an uninterrupted one, and so does a build over several processes
(jax.distributed): each takes every n-th missing shard, and the cache is complete when every shard
is, whoever wrote it. Images that are missing, cannot be decoded or are too small, and images without
a caption, are logged with the reason, skipped and counted.

Paths go through etils.epath: the data and the cache may be in a bucket (gs://...) where its file
system library is installed.

`open_cache` reads the folder back with random access for `batches.make_batches`, which samples the
posterior per batch; the stored latents are therefore the posterior (mean, log-variance), unscaled.
"""

import concurrent.futures
import io
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable

import numpy as np
from etils import epath
from tqdm import tqdm

from lumina_jax.buckets import is_remote
from lumina_jax.training.data import (
    CROP_STEP,
    MAX_ASPECT,
    Example,
    check_captioned,
    crop_sizes,
    fingerprint,
    load_image,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
SETTINGS_FILE = "settings.json"
COMPLETE_FILE = "cache.json"
_HEADER_LOCK = threading.Lock()  # LatentCache.__getitem__
LOADER_THREADS = 16  # images read, decoded and cropped at once while a shard is built
EMPTY_CAPTION_FILE = "empty_caption.npz"

# images [B, H, W, 3] in [-1, 1] -> (mean [B, C, h, w], logvar [B, C, h, w] or None for pixel space)
ImageEncoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
# prompts -> (features [B, L, D], mask [B, L])
TextEncoder = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def no_barrier(name: str) -> None:
    """One process: nobody to wait for."""


def build_cache(
    examples: list[Example],
    out_dir: str | os.PathLike,
    *,
    encode_images: ImageEncoder,
    encode_text: TextEncoder,
    image_size: int,
    crop_step: int = CROP_STEP,
    max_aspect: float = MAX_ASPECT,
    min_image_side: int | None = None,
    scaling_factor: float = 1.0,
    shift_factor: float = 0.0,
    shard_size: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[str], None] = no_barrier,
    progress: bool = True,
) -> dict:
    """Encode the examples' images and captions (`data.read_examples`) into `out_dir` (resuming a
    partial build there); returns the cache's metadata (the contents of cache.json).

    Images are cropped as the original trainer does (`data.crop_sizes(image_size, crop_step,
    max_aspect)`) and encoded `batch_size` at a time, images of one crop size together; a shard's
    images are held in memory until it is written (64 crops of 1024^2 pixels take 0.8 GB). Images
    whose shorter side is under `min_image_side` (default image_size // 4) are skipped: the crop would
    enlarge them more than 4 times. `scaling_factor` and `shift_factor` are the VAE's; they are stored
    and applied when batches are made.

    With several processes, every one calls this with its `process_index`, the same `process_count`
    and a `barrier(name)` that returns once all processes reached it (e.g. JAX's
    `multihost_utils.sync_global_devices`); each builds its share of the missing shards.
    """
    out_dir = epath.Path(out_dir)
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be at least 1, got {shard_size} and {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    check_captioned(examples, f"the data set of cache {out_dir}")  # before anything is written
    min_image_side = image_size // 4 if min_image_side is None else min_image_side
    settings = {
        "format_version": FORMAT_VERSION,
        "examples_sha256": fingerprint(examples),
        "data_examples": len(examples),
        "image_size": image_size,
        "crop_step": crop_step,
        "max_aspect": max_aspect,
        "min_image_side": min_image_side,
        "shard_size": shard_size,
        "seed": seed,
        "scaling_factor": float(scaling_factor),
        "shift_factor": float(shift_factor),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_or_write_settings(out_dir, settings)
    if process_index == 0 and not (out_dir / EMPTY_CAPTION_FILE).exists():
        [empty] = _encode_captions(encode_text, [""], batch_size)
        _write_npz(out_dir / EMPTY_CAPTION_FILE, {"features": empty})

    sizes = crop_sizes(image_size, crop_step, max_aspect)
    num_shards = -(-len(examples) // shard_size)
    missing = [k for k in range(num_shards) if not _shard_path(out_dir, k, ".json").exists()]
    barrier("lumina_jax cache: shards listed")  # no process writes a shard before all have listed the missing ones
    mine = missing[process_index::process_count]
    for shard in tqdm(mine, desc="cache shards", unit="shard", disable=not progress):
        start = shard * shard_size
        _build_shard(
            out_dir,
            shard,
            examples[start : start + shard_size],
            start,
            sizes,
            min_image_side,
            seed,
            encode_images,
            encode_text,
            batch_size,
        )
    barrier("lumina_jax cache: shards written")

    not_written = [k for k in range(num_shards) if not _shard_path(out_dir, k, ".json").exists()]
    if not_written:
        raise FileNotFoundError(
            f"{out_dir}: shards {not_written[:10]} were not written by any process; rerun to build them"
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
    if not metadata["examples"]:  # a cache of nothing would load as complete and fail only when batched
        first = skipped[0]
        raise ValueError(
            f"{out_dir}: none of the {len(skipped)} images could be used (the first, {first['source']}: "
            f"{first['reason']}; the log lists every one)"
        )
    if process_index == 0:
        _write_json(out_dir / COMPLETE_FILE, metadata)
        logger.info(f"cache {out_dir}: {metadata['examples']} examples, {len(skipped)} images skipped")
    barrier("lumina_jax cache: complete")  # no process opens the cache before it is
    return metadata


def _check_or_write_settings(out_dir: epath.Path, settings: dict) -> None:
    path = out_dir / SETTINGS_FILE
    if not path.exists():
        _write_json(path, settings)  # several processes may: each writes the same, atomically
        return
    previous = json.loads(path.read_text())
    changed = [f"{k}: {previous.get(k)!r} then, {v!r} now" for k, v in settings.items() if previous.get(k) != v]
    if changed:
        raise ValueError(
            f"{out_dir} holds a cache built with other settings ({'; '.join(changed)}); "
            "build into a new folder or delete this one"
        )


def _build_shard(
    out_dir, shard, examples: list[Example], start, sizes, min_side, seed, encode_images, encode_text, batch_size
):
    def load(index: int, example: Example) -> np.ndarray | Exception:
        try:
            if example.prompt is None:
                raise ValueError("no caption")
            return load_image(example, sizes, np.random.default_rng([seed, index]), min_side)
        except Exception as e:  # PIL raises many types for bad files; one image must not end the run
            return e

    # Threads: reading (from a bucket, say) waits, and PIL decodes and resizes with the GIL released.
    with concurrent.futures.ThreadPoolExecutor(LOADER_THREADS) as pool:
        loaded = list(pool.map(load, range(start, start + len(examples)), examples))
    images, kept, skipped = [], [], []
    for example, image in zip(examples, loaded):
        if isinstance(image, Exception):
            reason = f"{type(image).__name__}: {image}"
            logger.warning(f"skipping {example.where}: {reason}")
            skipped.append({"source": example.where, "reason": reason})
        else:
            images.append(image)
            kept.append(example)

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
                "source": example.where,
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


def _shard_path(out_dir: epath.Path, shard: int, suffix: str) -> epath.Path:
    return out_dir / f"shard-{shard:05d}{suffix}"


def _write_atomic(path: epath.Path, write: Callable) -> None:
    """Write through `write(file)` to a temporary sibling, then rename it over `path`; in a bucket, where a
    rename is a copy, into memory, then upload it as `path` at once."""
    if is_remote(path):
        buffer = io.BytesIO()
        write(buffer)
        path.write_bytes(buffer.getvalue())
        return
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with temporary.open("wb") as f:
            write(f)
        temporary.replace(path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _write_json(path: epath.Path, value: dict) -> None:
    _write_atomic(path, lambda f: f.write((json.dumps(value, indent=1) + "\n").encode()))


def _write_npz(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
    _write_atomic(path, lambda f: np.savez(f, **arrays))


class LatentCache:
    """Random access to a built cache: `cache[i]` is example i's {"mean", "logvar" (absent in pixel
    space), "caption"} numpy arrays and its "prompt". Safe to read from several threads."""

    def __init__(self, folder: epath.Path, metadata: dict, records: list[dict], empty_caption: np.ndarray):
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
        # One open file per reader; only this example's members of the zip are read.
        with _shard_path(self.folder, record["shard"], ".npz").open("rb") as file, np.load(file) as shard:
            names = [name for name in ("mean", "caption", "logvar") if f"{name}_{j}" in shard]
            members = {name: shard.zip.read(f"{name}_{j}.npy") for name in names}
        # numpy parses each array's header with ast.literal_eval, which CPython 3.11 can fail at random when
        # threads call it at once ("AST constructor recursion depth mismatch"): the bytes are read above in
        # parallel, the headers parsed here one thread at a time.
        with _HEADER_LOCK:
            item = {name: np.lib.format.read_array(io.BytesIO(member)) for name, member in members.items()}
        return item | {"prompt": record["prompt"]}


def open_cache(folder: str | os.PathLike) -> LatentCache:
    """The cache `build_cache` wrote to `folder`; raises FileNotFoundError if it is missing or unfinished."""
    folder = epath.Path(folder)
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
        raise ValueError(
            f"{complete}: format_version {metadata.get('format_version')}, expected {FORMAT_VERSION}; "
            "build the cache again into a new folder"
        )
    records = []
    for shard in range(metadata["shards"]):
        for path in (_shard_path(folder, shard, ".json"), _shard_path(folder, shard, ".npz")):
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing from the cache {folder}; rebuild it")
        contents = json.loads(_shard_path(folder, shard, ".json").read_text())
        records += [{**r, "shard": shard, "position": j} for j, r in enumerate(contents["examples"])]
    with (folder / EMPTY_CAPTION_FILE).open("rb") as file, np.load(file) as empty:
        empty_caption = empty["features"]
    return LatentCache(folder, metadata, records, empty_caption)


def pipeline_encoders(pipe, pixel_channels: int = 3) -> tuple[ImageEncoder, TextEncoder, float, float]:
    """(encode_images, encode_text, scaling_factor, shift_factor) for `build_cache`, from a
    `LuminaPipeline`: its VAE's posterior (jitted; pixel space when `pipe.vae` is None, in grey when
    pixel_channels is 1) and `pipe.encode_texts` of the text encoder's `training_captions` (as the family's
    original trainer writes them).

    On a pipeline with a mesh (`LuminaPipeline.shard`), each batch is split over the mesh's batch
    axes, data-parallel: padded with repeats of its last item to a multiple of their size."""
    import jax  # here: the cache reader and the tests' numpy encoders need no JAX
    from flax import nnx

    from lumina_jax.sharding import BATCH_AXES, batch_sharding

    mesh = getattr(pipe, "mesh", None)
    ways = 1 if mesh is None else math.prod(mesh.shape[axis] for axis in BATCH_AXES)

    def encode_text(prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        count = len(prompts)
        captions = pipe.text_encoder.config.training_captions(list(prompts) + [prompts[-1]] * (-count % ways))
        features, mask = pipe.encode_texts(captions)
        return np.asarray(features[:count], np.float32), np.asarray(mask[:count], bool)

    if pipe.vae is None:
        if pixel_channels not in (1, 3):
            raise ValueError(f"a pixel-space model has 1 (grey) or 3 (RGB) channels, got {pixel_channels}")
        return (_pixel_space if pixel_channels == 3 else _grey_pixel_space), encode_text, 1.0, 0.0

    graphdef, params = nnx.split(pipe.vae)
    encode = jax.jit(lambda params, images: nnx.merge(graphdef, params).encode(images))

    def encode_images(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Padded to a power of two (a few compiled programs per crop size, not one per batch size),
        # then to a multiple of the batch axes.
        count = len(images)
        padded_count = -(-(1 << (count - 1).bit_length()) // ways) * ways
        padded = np.concatenate([images, np.repeat(images[-1:], padded_count - count, axis=0)])
        padded = padded.transpose(0, 3, 1, 2)  # the VAE reads [B, 3, H, W]
        if mesh is not None:
            padded = jax.device_put(padded, batch_sharding(mesh))
        mean, logvar = encode(params, padded)
        return np.asarray(mean[:count]), np.asarray(logvar[:count])

    config = pipe.vae.config
    return encode_images, encode_text, config.scaling_factor, config.shift_factor or 0.0


def _pixel_space(images: np.ndarray) -> tuple[np.ndarray, None]:
    return images.transpose(0, 3, 1, 2), None


def _grey_pixel_space(images: np.ndarray) -> tuple[np.ndarray, None]:
    return images.mean(axis=-1, keepdims=True).transpose(0, 3, 1, 2), None
