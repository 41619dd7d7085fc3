"""Training images as the original Lumina-Next trainer reads them: JSONL manifests and multi-aspect crops.

A manifest line is {"path" or "image": ..., "prompt": ...} or, in the chat format,
{"image": ..., "conversations": [question, {"value": caption}]}. Each image is cropped to one of a
fixed list of sizes near image_size^2 pixels (sides in steps of 16, aspect ratio at most 4): one of
the four sizes whose aspect ratio best matches the image is picked at random, the image is resized
so that size just fits, and a random window of that size is cut out (the original's `var_center_crop`,
despite its name, places the window at random).
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

CROP_STEP = 16  # the VAE's 8 x the transformer's patch 2: one latent token per 16 x 16 pixels
MAX_ASPECT = 4.0
TOP_K = 4  # the original picks among this many best-matching sizes


@dataclasses.dataclass(frozen=True)
class Example:
    """One manifest line: an image on disk and its caption."""

    image: Path
    prompt: str
    line: int  # 1-based line number in the manifest, for messages


def read_manifest(path: str | Path) -> list[Example]:
    """The examples of a JSONL manifest; relative image paths are resolved against the manifest's folder.

    Blank lines are ignored; any other line that is not one of the two formats raises a ValueError
    naming the file and line.
    """
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                image, prompt = _parse_line(text, f"{path}:{number}")
                examples.append(Example(path.parent / image, prompt, number))
    return examples


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


def load_image(path: str | Path, sizes: list[tuple[int, int]], rng: np.random.Generator) -> np.ndarray:
    """The image at `path`, cropped to one of `sizes`, as float32 [H, W, 3] in [-1, 1].

    Raises what PIL raises for a missing or unreadable file (OSError and others)."""
    with Image.open(path) as image:
        image = image.convert("RGB")  # decodes the whole file, so truncated images fail here
    size = choose_crop_size(image.width, image.height, sizes, rng)
    pixels = np.asarray(crop(image, size, rng), dtype=np.float32)
    return pixels / 127.5 - 1.0
