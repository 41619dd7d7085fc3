"""Training images as people hold them, cropped as the original Lumina-Next trainer crops them.

Three layouts (`read_examples`):
- a JSONL manifest, as the original trainer reads it: a line is {"path" or "image": ..., "prompt": ...}
  or, in the chat format, {"image": ..., "conversations": [question, {"value": caption}]};
- a Hugging Face data set in parquet (a .parquet file, or a folder holding them): an image column of
  `Image` structs (bytes, path), raw bytes or paths, and a caption column;
- an image folder: a.jpg with its caption in a.txt beside it.
Paths go through etils.epath, so they may be in a bucket (gs://...).

Each image is cropped to one of a fixed list of sizes near image_size^2 pixels (sides in steps of 16,
aspect ratio at most 4): one of the four sizes whose aspect ratio best matches the image is picked at
random, the image is resized so that size just fits, and a random window of that size is cut out (the
original's `var_center_crop`, despite its name, places the window at random).
"""

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import threading

import numpy as np
from etils import epath
from PIL import Image

from lumina_jax.buckets import files_under

CROP_STEP = 16  # the VAE's 8 x the transformer's patch 2: one latent token per 16 x 16 pixels
MAX_ASPECT = 4.0
TOP_K = 4  # the original picks among this many best-matching sizes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class Example:
    """One image and its caption, and where they came from."""

    image: str  # the image file (a path or gs:// URL); for parquet, the .parquet file
    prompt: str | None  # None: no caption (an image folder's image without its .txt); the cache skips it
    where: str  # for messages and the cache's records: "train.jsonl:3", "train-0.parquet row 7", "photos/a.jpg"
    row: int | None = None  # parquet: the row in that file
    column: str | None = None  # parquet: the image column

    def read_bytes(self) -> bytes:
        """The encoded image file."""
        if self.row is None:
            return epath.Path(self.image).read_bytes()
        value = _parquet_cell(self.image, self.row, self.column)
        if isinstance(value, dict):  # a Hugging Face Image: the bytes, or else a path
            if value.get("bytes") is not None:
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, bytes):
            return value
        if isinstance(value, str) and value:
            return (epath.Path(self.image).parent / value).read_bytes()
        raise ValueError(f"{self.where}: column {self.column!r} holds no image ({type(value).__name__})")


def read_examples(
    data: str | os.PathLike, *, image_column: str = "image", caption_column: str = "text"
) -> list[Example]:
    """The examples of a data set in any of the three layouts: a `.jsonl` manifest, a `.parquet` file or a
    folder holding any (searched recursively, in path order), or an image folder.

    Raises a ValueError for a data set without a captioned example: its cache would hold nothing."""
    examples = _read_layout(epath.Path(data), image_column, caption_column)
    check_captioned(examples, data)
    return examples


def check_captioned(examples: list[Example], data: str | os.PathLike) -> None:
    """Raises a ValueError naming `data` (where the examples came from) if none has a caption."""
    if not any(e.prompt is not None for e in examples):
        raise ValueError(
            f"{data}: no example to train on: {len(examples)} examples, none with a caption "
            "(an image folder's a.jpg needs a.txt beside it; a parquet row, a caption in its caption column)"
        )


def _read_layout(path: epath.Path, image_column: str, caption_column: str) -> list[Example]:
    if path.is_dir():
        files = files_under(path)
        parquet = [f for f in files if f.suffix == ".parquet"]
        if parquet:
            return [e for file in parquet for e in _read_parquet(file, image_column, caption_column)]
        return _read_image_folder(path, files)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix == ".jsonl":
        return read_manifest(path)
    if path.suffix == ".parquet":
        return _read_parquet(path, image_column, caption_column)
    raise ValueError(
        f"{path}: not a data set; expected a .jsonl manifest, a .parquet file or a folder of them, "
        f"or a folder of images with a caption file each ({', '.join(IMAGE_SUFFIXES)} and .txt)"
    )


def read_manifest(path: str | os.PathLike) -> list[Example]:
    """The examples of a JSONL manifest; relative image paths are resolved against the manifest's folder.

    Blank lines are ignored; any other line that is not one of the two formats raises a ValueError
    naming the file and line.
    """
    path = epath.Path(path)
    examples = []
    with path.open("r", encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                where = f"{path}:{number}"
                image, prompt = _parse_line(text, where)
                examples.append(Example(str(path.parent / image), prompt, where))
    return examples


def _read_parquet(path: epath.Path, image_column: str, caption_column: str) -> list[Example]:
    """One example per row; only the captions are read here, the images when the cache reads them."""
    import pyarrow.parquet as pq  # here: only parquet data sets need it

    with path.open("rb") as f:
        columns = pq.read_schema(f).names
    for column, setting in ((image_column, "image_column"), (caption_column, "caption_column")):
        if column not in columns:
            raise ValueError(f"{path} has no column {column!r} (columns: {', '.join(columns)}); set {setting}")
    with path.open("rb") as f:
        captions = pq.read_table(f, columns=[caption_column]).column(0).to_pylist()
    return [
        Example(str(path), caption if isinstance(caption, str) else None, f"{path} row {row}", row, image_column)
        for row, caption in enumerate(captions)
    ]


def _shared_lru_cache(maxsize: int):
    """functools.lru_cache(maxsize), except that threads asking for the same arguments at once share one
    call: the cache's reader threads all miss on the row group they start in, and lru_cache would read it
    once per thread. A call that raises is not kept."""

    def decorate(read):
        lock, futures = threading.Lock(), collections.OrderedDict()

        @functools.wraps(read)
        def cached(*key):
            with lock:
                future = futures.get(key)
                first = future is None
                if first:
                    future = futures[key] = concurrent.futures.Future()
                futures.move_to_end(key)
                if len(futures) > maxsize:
                    futures.popitem(last=False)  # its waiters hold their future
            if first:
                try:
                    future.set_result(read(*key))
                except BaseException as e:
                    with lock:
                        if futures.get(key) is future:
                            del futures[key]
                    future.set_exception(e)
            return future.result()

        return cached

    return decorate


@_shared_lru_cache(maxsize=16)
def _parquet_row_groups(path: str) -> tuple[int, ...]:
    """The first row of each row group of a parquet file, and its row count last."""
    import pyarrow.parquet as pq

    with epath.Path(path).open("rb") as f:
        metadata = pq.read_metadata(f)
    starts = [0]
    for group in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(group).num_rows)
    return tuple(starts)


@_shared_lru_cache(maxsize=4)  # the few row groups the cache's loader threads are reading
def _parquet_row_group(path: str, group: int, column: str) -> list:
    import pyarrow.parquet as pq

    with epath.Path(path).open("rb") as f:
        return pq.ParquetFile(f).read_row_group(group, columns=[column]).column(0).to_pylist()


def _parquet_cell(path: str, row: int, column: str):
    starts = _parquet_row_groups(path)
    group = int(np.searchsorted(starts, row, side="right")) - 1
    return _parquet_row_group(path, group, column)[row - starts[group]]


def _read_image_folder(folder: epath.Path, files: list[epath.Path]) -> list[Example]:
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise ValueError(f"{folder}: no data set here: no .parquet files, and no images ({', '.join(IMAGE_SUFFIXES)})")
    examples = []
    for image in images:
        caption = image.with_suffix(".txt")
        prompt = caption.read_text(encoding="utf-8").strip() if caption.exists() else None
        examples.append(Example(str(image), prompt, str(image)))
    return examples


def fingerprint(examples: list[Example]) -> str:
    """What a cache is built from: a hash of each example's image, row and caption (no image is read)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.image, example.row, example.prompt]).encode())
    return digest.hexdigest()


def _parse_line(text: str, where: str) -> tuple[str, str]:
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if "conversations" in item:
        turns = item["conversations"]
        if "image" not in item:
            raise ValueError(f'{where}: a "conversations" line needs an "image" key')
        if not (isinstance(turns, list) and len(turns) == 2 and isinstance(turns[1], dict) and "value" in turns[1]):
            raise ValueError(f'{where}: "conversations" must be two turns, the second {{"value": caption}}')
        image, prompt = item["image"], turns[1]["value"]
    else:
        keys = [k for k in ("path", "image") if k in item]
        if not keys or "prompt" not in item:
            raise ValueError(f'{where}: expected "path" or "image" and "prompt" (or "conversations"), got {list(item)}')
        image, prompt = item[keys[0]], item["prompt"]
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: the image path must be a non-empty string, got {image!r}")
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: the caption must be one string, got {type(prompt).__name__}")
    return image, prompt


def crop_sizes(image_size: int, step: int = CROP_STEP, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """The original's crop sizes, as (height, width): multiples of `step` with at most
    (image_size / step)^2 tiles of step x step pixels and an aspect ratio of at most `max_aspect`.

    The original walks widths down from the tile budget N while raising the height as far as the budget
    allows, keeping every (width, height) it visits: for width w, the heights N // (w + 1) ... N // w.
    """
    if image_size < step or max_aspect < 1:
        raise ValueError(f"image_size must be at least step ({step}), got {image_size}; max_aspect >= 1")
    budget = round((image_size / step) ** 2)
    sizes = []
    for width in range(budget, 0, -1):
        for height in range(max(1, budget // (width + 1)), budget // width + 1):
            if max(width, height) / min(width, height) <= max_aspect:
                sizes.append((height * step, width * step))
    return sizes


def choose_crop_size(
    width: int, height: int, sizes: list[tuple[int, int]], rng: np.random.Generator, top_k: int = TOP_K
) -> tuple[int, int]:
    """One of the `top_k` sizes (height, width) whose aspect ratio is closest to a width x height image's."""

    def match(size):  # the fraction of the image kept, were it scaled to cover the crop
        fit_w, fit_h = size[1] / width, size[0] / height
        return min(fit_w, fit_h) / max(fit_w, fit_h), size[1], size[0]  # ties as the original: larger width first

    best = sorted(sizes, key=match, reverse=True)[:top_k]
    return best[rng.integers(len(best))]


def crop(image: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Resize `image` so that a (height, width) window just fits, then cut one out at a random place."""
    crop_h, crop_w = size
    # Halve with box filtering first, as the original does: a large bicubic downscale would alias.
    while image.width >= 2 * crop_w and image.height >= 2 * crop_h:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = max(crop_w / image.width, crop_h / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC)
    left = int(rng.integers(image.width - crop_w, endpoint=True))
    top = int(rng.integers(image.height - crop_h, endpoint=True))
    return image.crop((left, top, left + crop_w, top + crop_h))


def load_image(
    example: Example, sizes: list[tuple[int, int]], rng: np.random.Generator, min_side: int = 0
) -> np.ndarray:
    """The example's image, cropped to one of `sizes`, as float32 [H, W, 3] in [-1, 1].

    Raises what reading and PIL raise for a missing or unreadable file (OSError and others), and a
    ValueError for an image whose shorter side is under `min_side` pixels."""
    with Image.open(io.BytesIO(example.read_bytes())) as image:
        image = image.convert("RGB")  # decodes the whole file, so truncated images fail here
    if min(image.size) < min_side:
        raise ValueError(f"{example.where}: {image.width}x{image.height} px, under the minimum side of {min_side} px")
    size = choose_crop_size(image.width, image.height, sizes, rng)
    pixels = np.asarray(crop(image, size, rng), dtype=np.float32)
    return pixels / 127.5 - 1.0
