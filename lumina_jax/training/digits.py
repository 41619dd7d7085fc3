"""The digits demo's building blocks: data set, tokenizer, text encoder and evaluation.

The demo trains a small pixel-space Next-DiT on scikit-learn's handwritten digits (1,797 images of
8x8, ink 0..16), upscaled to 32x32 RGB, dark ink on white paper, captioned from their labels in
varied wording. Its text encoder is a tiny Gemma with random, frozen weights behind a word-level
tokenizer built here: the Next-DiT learns to read the features, so they need only tell digits apart.
Quality is what a classifier trained on the real digits makes of generated ones, after mapping them
back to scikit-learn's 8x8 ink scale.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from lumina_jax.models.gemma import GemmaConfig
from lumina_jax.weights import gemma, importer
from lumina_jax.weights.orbax_io import atomic_folder

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Each is filled with the digit as a word ("seven") or a numeral ("7").
CAPTION_TEMPLATES = (
    "a handwritten digit {}",
    "the number {}, written by hand",
    "a hand-drawn {}",
    "the digit {}",
    "a scanned handwritten {}",
    "{} written in dark ink on white paper",
    "a picture of the number {}",
    "number {}",
)
MANIFEST = "captions.jsonl"
IMAGES_DIR = "images"
SKLEARN_SIDE = 8  # load_digits images are 8x8
SKLEARN_INK_MAX = 16.0
# Gemma's special tokens at Gemma's ids, so the pipeline pads with 0 and every caption starts with <bos>.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def caption(label: int, rng: np.random.Generator) -> str:
    """A caption naming digit `label`, in a random template, as a word or a numeral."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(DIGIT_WORDS[label] if rng.integers(2) else str(label))


def all_captions(label: int) -> list[str]:
    """Every caption `caption` can give for `label`."""
    return [t.format(form) for t in CAPTION_TEMPLATES for form in (DIGIT_WORDS[label], str(label))]


def caption_vocabulary() -> list[str]:
    """The words (and punctuation) of every caption, as the tokenizer splits them, sorted."""
    split = pre_tokenizers.Whitespace()
    return sorted(
        {word.lower() for d in range(10) for text in all_captions(d) for word, _ in split.pre_tokenize_str(text)}
    )


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError('the digits demo needs scikit-learn: pip install -e ".[digits]"') from error
    return load_digits()


def render(ink: np.ndarray, size: int) -> np.ndarray:
    """One 8x8 scikit-learn digit (ink 0..16) as a size x size RGB uint8 image, dark ink on white paper,
    upscaled bicubically so strokes are smooth."""
    paper = np.round(255.0 * (1.0 - np.asarray(ink, np.float64) / SKLEARN_INK_MAX)).astype(np.uint8)
    grey = Image.fromarray(paper).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(grey.convert("RGB"))


def write_dataset(
    out_dir: str | os.PathLike, *, size: int = 32, seed: int = 0, limit: int | None = None, mirrored: bool = False
) -> Path:
    """Write the digits as PNGs under out_dir/images/ and out_dir/captions.jsonl; returns the JSONL's path.

    Each JSONL line is {"path": "images/0000.png", "prompt": ..., "label": 0..9}, the path relative to
    the JSONL's folder; line i is load_digits image i. `limit` keeps the first `limit` images; `mirrored`
    writes every digit mirror-written (flipped left to right), a style the shipped model has never seen. The folder
    is written whole under a temporary name, then renamed: a folder with captions.jsonl is complete. If
    it already holds the data set these arguments describe, nothing is written; another data set there
    is replaced; a folder holding anything else is refused.
    """
    if size % SKLEARN_SIDE or size < SKLEARN_SIDE:
        raise ValueError(f"size must be a positive multiple of {SKLEARN_SIDE} (evaluation averages blocks), got {size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for all 1,797 digits), got {limit}")
    out_dir = Path(out_dir)
    digits = _load_digits()
    count = len(digits.target) if limit is None else min(limit, len(digits.target))
    rng = np.random.default_rng(seed)
    records = [
        {"path": f"{IMAGES_DIR}/{i:04d}.png", "prompt": caption(int(label), rng), "label": int(label)}
        | ({"mirrored": True} if mirrored else {})
        for i, label in enumerate(digits.target[:count])
    ]
    manifest = "".join(json.dumps(r) + "\n" for r in records)
    # The size lives only in the PNGs: compare it too, or a rewrite at another size would look done.
    if (out_dir / MANIFEST).is_file() and (out_dir / MANIFEST).read_text() == manifest:
        if all((out_dir / r["path"]).is_file() for r in records):
            with Image.open(out_dir / records[0]["path"]) as first:
                if first.size == (size, size):
                    return out_dir / MANIFEST
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise FileExistsError(f"{out_dir} exists and is not a digits data set (no {MANIFEST}); choose an empty folder")
    with atomic_folder(out_dir, overwrite=True) as partial:
        (partial / IMAGES_DIR).mkdir()
        for record, ink in zip(records, digits.images):
            Image.fromarray(render(ink[:, ::-1] if mirrored else ink, size)).save(partial / record["path"])
        (partial / MANIFEST).write_text(manifest)
    return out_dir / MANIFEST


def build_tokenizer(words: Iterable[str]):
    """A word-level tokenizer (a transformers PreTrainedTokenizerFast) over `words`, lower-cased, splitting
    punctuation off words. Like Gemma's it holds <pad> 0, <eos> 1, <bos> 2, <unk> 3, starts every text with
    <bos> (so an empty negative prompt still has a token to attend to) and pads on the right."""
    from transformers import PreTrainedTokenizerFast  # here, not at import: transformers takes seconds to import

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted({w.lower() for w in words} - set(vocab)):
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    bos = ("<bos>", vocab["<bos>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[bos]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="right",
    )


def text_encoder_config(vocab_size: int, *, hidden: int = 64, layers: int = 2, head_dim: int = 16) -> GemmaConfig:
    """A tiny Gemma: one key/value head as in gemma-2b, an MLP twice as wide as the stream. Lumina reads
    hidden_states[-2], so only layers - 1 layers run."""
    if hidden % head_dim:
        raise ValueError(f"hidden ({hidden}) must be a multiple of head_dim ({head_dim})")
    return GemmaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=256,
    )


def random_text_encoder(config: GemmaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A GemmaModel state dict (transformers' names and layouts) of random weights, drawn in NumPy so the
    files do not depend on JAX's random numbers. Gemma scales embeddings by sqrt(hidden), so embeddings
    N(0, 1/hidden) enter the residual stream at unit scale; matrices N(0, 1/fan_in) keep attention and
    MLP outputs near that scale; norms start at Gemma's identity (weight offset 0), biases at 0."""
    rng = np.random.default_rng(seed)
    params = {}
    for path, shape in gemma.parameter_shapes(config).items():
        if path[-1] == "embedding":
            params[path] = rng.normal(0.0, config.hidden_size**-0.5, shape)
        elif path[-1] == "kernel":  # [layers, in, out]
            params[path] = rng.normal(0.0, shape[-2] ** -0.5, shape)
        else:
            params[path] = np.zeros(shape)
    params = {path: value.astype(np.float32) for path, value in params.items()}
    return importer.export_state_dict(importer.unflatten(params), gemma.gemma_keys(config), gemma.gemma_key_to_target)


def write_text_stack(
    out_dir: str | os.PathLike, *, vocabulary: Sequence[str], hidden: int = 64, layers: int = 2, seed: int = 0
) -> tuple[Path, Path]:
    """Write out_dir/tokenizer/ (build_tokenizer(vocabulary)) and out_dir/text_encoder/ (config.json and
    model.safetensors of a tiny Gemma with random weights, as transformers' GemmaModel lays them out);
    returns both folders. Each is written under a temporary name and renamed into place, replacing
    what was there; the same arguments write the same files. With `random_text_encoder`'s scales each
    token's own word dominates the features at its position, and reaches those after it.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(vocabulary)
    with atomic_folder(out_dir / "tokenizer", overwrite=True) as partial:
        tokenizer.save_pretrained(partial)
        # transformers 5 names the class TokenizersBackend, which transformers 4 does not know; both
        # load the name PreTrainedTokenizerFast as this same class.
        config_file = partial / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": TOKENIZER_CLASS}))
    config = text_encoder_config(len(tokenizer), hidden=hidden, layers=layers)
    with atomic_folder(out_dir / "text_encoder", overwrite=True) as partial:
        (partial / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        save_file(random_text_encoder(config, seed), str(partial / "model.safetensors"), metadata={"format": "pt"})
    return out_dir / "tokenizer", out_dir / "text_encoder"


@dataclasses.dataclass(frozen=True)
class DigitClassifier:
    """An RBF support-vector classifier of scikit-learn's 8x8 digits (features: the 64 inks, 0..16)."""

    estimator: object
    held_out: np.ndarray  # indices into load_digits() it was not trained on
    held_out_accuracy: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.estimator.predict(features)


@functools.cache
def digit_classifier(seed: int = 0, held_out_fraction: float = 0.25) -> DigitClassifier:
    """Trained on the real digits, less a stratified held-out `held_out_fraction`, scored on that."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = _load_digits()
    indices = np.arange(len(digits.target))
    train, test = train_test_split(indices, test_size=held_out_fraction, stratify=digits.target, random_state=seed)
    estimator = SVC(gamma=0.001, C=10.0).fit(digits.data[train], digits.target[train])
    accuracy = float(np.mean(estimator.predict(digits.data[test]) == digits.target[test]))
    return DigitClassifier(estimator, test, accuracy)


def ink_features(images: np.ndarray) -> np.ndarray:
    """Our images [N, H, W, 3] (uint8, or floats in [0, 1]; dark ink on white) on scikit-learn's scale:
    grey, inverted, averaged over 8x8 blocks, times 16 -> [N, 64] inks in 0..16."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
    n, height, width, _ = images.shape
    if height % SKLEARN_SIDE or width % SKLEARN_SIDE:
        raise ValueError(f"image height and width must be multiples of {SKLEARN_SIDE}, got {height}x{width}")
    if images.dtype == np.uint8:
        grey = images.mean(axis=-1) / 255.0
    else:
        if images.min() < -1e-3 or images.max() > 1 + 1e-3:  # e.g. [-1, 1] latents passed by mistake
            raise ValueError(f"float images must lie in [0, 1], got values in [{images.min()}, {images.max()}]")
        grey = np.clip(images.astype(np.float64).mean(axis=-1), 0.0, 1.0)
    blocks = (1.0 - grey).reshape(n, SKLEARN_SIDE, height // SKLEARN_SIDE, SKLEARN_SIDE, width // SKLEARN_SIDE)
    return blocks.mean(axis=(2, 4)).reshape(n, -1) * SKLEARN_INK_MAX


def evaluate(images: np.ndarray, labels: Sequence[int], classifier: DigitClassifier | None = None) -> dict:
    """How often the classifier reads each image as its label: {"accuracy": float, "per_digit": {digit:
    accuracy} for the digits present, "confusion": 10x10 counts, rows the label, columns the reading}."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"{len(images)} images but labels of shape {labels.shape}; give one label per image")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"labels must be digits 0..9, got values in [{labels.min()}, {labels.max()}]")
    predicted = (classifier or digit_classifier()).predict(ink_features(images))
    confusion = np.zeros((10, 10), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "per_digit": {int(d): float(np.mean(predicted[labels == d] == d)) for d in np.unique(labels)},
        "confusion": confusion.tolist(),
    }


def evaluate_pipeline(
    pipe,
    *,
    samples_per_digit: int = 20,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    classifier: DigitClassifier | None = None,
    mirrored: bool = False,
) -> dict:
    """Generate samples_per_digit 32x32 images of each digit, from captions drawn as the training data's
    are, and score them with `evaluate` (`mirrored`: flipped left to right first, so mirror-written digits
    read as digits and plain ones as mirrored). One batch a digit, so every digit compiles the same program."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for digit in range(10):
        prompts = [caption(digit, rng) for _ in range(samples_per_digit)]
        out = pipe(
            prompt=prompts,
            height=32,
            width=32,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=int(rng.integers(2**31)),
            output_type="np",
        )
        images.append(np.asarray(out.images))
        labels += [digit] * samples_per_digit
    images = np.concatenate(images)
    return evaluate(images[:, :, ::-1] if mirrored else images, labels, classifier)


def write_base_pipeline(folder: str | os.PathLike, *, text_hidden: int = 64, seed: int = 0) -> Path:
    """The pipeline folder a digits run starts from, in diffusers' layout without a VAE (pixel space):
    model_index.json, scheduler/, tokenizer/ and text_encoder/ (write_text_stack); training adds transformer/."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_stack(folder, vocabulary=caption_vocabulary(), hidden=text_hidden, seed=seed)
    with atomic_folder(folder / "scheduler", overwrite=True) as partial:
        scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
        (partial / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = {
        "_class_name": "LuminaPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "GemmaModel"],
        "tokenizer": ["transformers", TOKENIZER_CLASS],
        "transformer": ["diffusers", "LuminaNextDiT2DModel"],
        "vae": [None, None],
    }
    partial = folder / "model_index.json.partial"
    partial.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(partial, folder / "model_index.json")
    return folder


def prepare_mirrored(config) -> None:
    """`TrainConfig.prepare` of lumina_jax/configs/digits_lora.py: the mirror-written data set beside config.data."""
    manifest = Path(config.data)
    if manifest.name != MANIFEST:
        raise ValueError(f"the digits data set's manifest is named {MANIFEST}, got {manifest}")
    write_dataset(manifest.parent, size=config.image_size, seed=config.seed, mirrored=True)


def prepare(config) -> None:
    """`TrainConfig.prepare` of lumina_jax/configs/digits.py: the data set beside config.data and the base
    pipeline at config.pipeline, its text encoder as wide as the transformer's cross_attention_dim."""
    manifest = Path(config.data)
    if manifest.name != MANIFEST:
        raise ValueError(f"the digits data set's manifest is named {MANIFEST}, got {manifest}")
    write_dataset(manifest.parent, size=config.image_size, seed=config.seed)
    write_base_pipeline(config.pipeline, text_hidden=config.transformer.cross_attention_dim, seed=config.seed)
