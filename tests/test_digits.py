"""The digits demo's building blocks: data set files and captions, the word-level tokenizer, the random
text encoder's features, and the evaluation's mapping back to scikit-learn's digits."""

import inspect
import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from lumina_jax.pipeline import LuminaPipeline
from lumina_jax.training import data, digits
from lumina_jax.weights.text_encoder import load_text_encoder

DIGIT_TOKENS = {token: d for d in range(10) for token in (digits.DIGIT_WORDS[d], str(d))}


def words(text: str) -> list[str]:
    return [w.lower() for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def named_digits(text: str) -> list[int]:
    return [DIGIT_TOKENS[w] for w in words(text) if w in DIGIT_TOKENS]


def read_manifest(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def real_digits():
    return load_digits()


@pytest.fixture(scope="module")
def full_dataset(tmp_path_factory):
    return digits.write_dataset(tmp_path_factory.mktemp("digits") / "data")


@pytest.fixture(scope="module")
def text_stack(tmp_path_factory):
    return digits.write_text_stack(tmp_path_factory.mktemp("stack"), vocabulary=digits.caption_vocabulary())


def test_every_caption_names_its_digit_and_no_other():
    rng = np.random.default_rng(0)
    for d in range(10):
        for text in digits.all_captions(d):
            assert named_digits(text) == [d], text
        drawn = {digits.caption(d, rng) for _ in range(200)}
        assert drawn <= set(digits.all_captions(d))
        assert len(drawn) >= len(digits.CAPTION_TEMPLATES)  # the wording varies
    assert "a handwritten digit seven" in digits.all_captions(7)
    assert "the number 7, written by hand" in digits.all_captions(7)


def test_write_dataset_writes_pngs_and_captions(tmp_path, real_digits):
    out = tmp_path / "data"
    manifest = digits.write_dataset(out, size=32, limit=12)
    assert manifest == out / digits.MANIFEST
    records = read_manifest(manifest)
    assert len(records) == 12
    for i, record in enumerate(records):
        assert record["label"] == real_digits.target[i]
        assert named_digits(record["prompt"]) == [record["label"]]
        image = np.asarray(Image.open(manifest.parent / record["path"]))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert (image == image[..., :1]).all()  # grey, replicated
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert corners.min() >= 240 and image.min() <= 64  # white paper, dark ink
    # the training loader reads it: the same images and prompts, in order
    examples = data.read_manifest(manifest)
    assert [(e.image, e.prompt) for e in examples] == [(str(out / r["path"]), r["prompt"]) for r in records]
    # the image is the digit: its blocks come back to scikit-learn's ink within the blur of resampling
    first = np.asarray(Image.open(manifest.parent / records[0]["path"]))[None]
    assert np.abs(digits.ink_features(first)[0] - real_digits.data[0]).mean() < 1.5


def test_write_dataset_is_idempotent_and_replaces_only_its_own(tmp_path):
    out = tmp_path / "data"
    manifest = digits.write_dataset(out, limit=5)
    stamp = manifest.stat().st_mtime_ns
    assert digits.write_dataset(out, limit=5) == manifest and manifest.stat().st_mtime_ns == stamp
    digits.write_dataset(out, size=16, limit=5)  # another size: rewritten
    assert Image.open(out / read_manifest(manifest)[0]["path"]).size == (16, 16)
    digits.write_dataset(out, limit=3, seed=1)
    assert len(read_manifest(manifest)) == 3 and len(list((out / digits.IMAGES_DIR).iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no partial folders left behind

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other exists and is not a digits data set"):
        digits.write_dataset(tmp_path / "other", limit=2)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="multiple of 8"):
        digits.write_dataset(tmp_path / "odd", size=20)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        digits.write_dataset(tmp_path / "none", limit=0)


def test_tokenizer_round_trip_and_special_tokens(tmp_path):
    tokenizer = digits.build_tokenizer(digits.caption_vocabulary())
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = {name: getattr(loaded, f"{name}_token_id") for name in ("pad", "eos", "bos", "unk")}
    assert ids == {"pad": 0, "eos": 1, "bos": 2, "unk": 3}  # Gemma's
    texts = ["The number 7, written by hand", "a handwritten digit seven", "a purple 7"]
    # the arguments the pipeline tokenizes prompts with
    batch = loaded(texts, pad_to_multiple_of=8, max_length=256, truncation=True, padding=True, return_tensors="np")
    assert batch.input_ids.shape == (3, 8) and loaded.padding_side == "right"
    tokens = [loaded.convert_ids_to_tokens(row) for row in batch.input_ids]
    assert tokens[0] == ["<bos>", "the", "number", "7", ",", "written", "by", "hand"]
    assert tokens[1] == ["<bos>", "a", "handwritten", "digit", "seven"] + ["<pad>"] * 3
    assert tokens[2][:4] == ["<bos>", "a", "<unk>", "7"]
    np.testing.assert_array_equal(batch.attention_mask.sum(1), [8, 5, 4])
    np.testing.assert_array_equal(batch.input_ids, tokenizer(texts, padding="max_length", max_length=8).input_ids)
    assert loaded(["", ""], padding="max_length", max_length=4).input_ids == [[2, 0, 0, 0]] * 2
    # every caption word is in the vocabulary
    for text in digits.all_captions(4):
        assert loaded.unk_token_id not in loaded(text).input_ids, text


def test_text_stack_loads_small_and_reproducible(text_stack, tmp_path):
    tokenizer_dir, encoder_dir = text_stack
    assert sum(f.stat().st_size for f in encoder_dir.iterdir()) < 1_000_000
    encoder = load_text_encoder(encoder_dir, progress=False)
    assert encoder.config.vocab_size == len(AutoTokenizer.from_pretrained(tokenizer_dir))
    assert encoder.config.hidden_size == 64
    again = digits.write_text_stack(tmp_path, vocabulary=digits.caption_vocabulary())
    for first, second in zip(text_stack, again):
        for file in first.iterdir():
            assert (second / file.name).read_bytes() == file.read_bytes(), file.name


def test_text_features_tell_the_digits_apart(text_stack):
    """At the digit's own token, the features of a digit written one way (word or numeral) in a template
    never seen are nearest to that digit's features in the other templates; and for every template,
    the masked means of the ten digits' captions (the Next-DiT's pooled caption input) differ."""
    tokenizer_dir, encoder_dir = text_stack
    tokenizer, encoder = AutoTokenizer.from_pretrained(tokenizer_dir), load_text_encoder(encoder_dir, progress=False)
    templates, forms = len(digits.CAPTION_TEMPLATES), 2
    captions = [c for d in range(10) for c in digits.all_captions(d)]  # digit, template, form
    batch = tokenizer(captions, padding=True, return_tensors="np")
    features = np.asarray(encoder(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)))
    features = features.reshape(10, templates, forms, *features.shape[1:])

    ids = batch.input_ids.reshape(10, templates, forms, -1)
    digit_ids = set(tokenizer.convert_tokens_to_ids(list(DIGIT_TOKENS)))
    at_digit = np.zeros(features.shape[:3] + features.shape[-1:])
    for index in np.ndindex(*ids.shape[:3]):
        position = next(i for i, token in enumerate(ids[index]) if token in digit_ids)
        at_digit[index] = features[index][position]
    at_digit /= np.linalg.norm(at_digit, axis=-1, keepdims=True)
    for held_out in range(templates):
        centroids = np.delete(at_digit, held_out, axis=1).mean(axis=1)  # [digit, form, hidden]
        for form in range(forms):
            nearest = np.argmax(at_digit[:, held_out, form] @ centroids[:, form].T, axis=-1)
            np.testing.assert_array_equal(nearest, np.arange(10), err_msg=f"template {held_out}, form {form}")

    mask = batch.attention_mask.reshape(10, templates, forms, -1, 1)
    pooled = (features * mask).sum(-2) / mask.sum(-2)
    distance = np.linalg.norm(pooled[:, None] - pooled[None], axis=-1) / np.linalg.norm(pooled, axis=-1).mean(0)
    off_diagonal = distance[~np.eye(10, dtype=bool)]
    assert off_diagonal.min() > 0.1  # measured 0.22 at the closest pair


def test_classifier_reads_real_digits_through_the_png_path(full_dataset, real_digits):
    classifier = digits.digit_classifier()
    assert classifier.held_out_accuracy >= 0.95
    records = read_manifest(full_dataset)
    held_out = classifier.held_out
    images = np.stack([np.asarray(Image.open(full_dataset.parent / records[i]["path"])) for i in held_out])
    labels = [records[i]["label"] for i in held_out]
    np.testing.assert_array_equal(labels, real_digits.target[held_out])
    result = digits.evaluate(images, labels)
    assert result["accuracy"] >= 0.95
    assert digits.evaluate(images / 255.0, labels)["accuracy"] == result["accuracy"]  # floats in [0, 1] alike
    assert set(result["per_digit"]) == set(range(10)) and min(result["per_digit"].values()) >= 0.85
    confusion = np.asarray(result["confusion"])
    assert confusion.sum() == len(labels) and np.trace(confusion) / len(labels) == result["accuracy"]
    np.testing.assert_array_equal(confusion.sum(1), np.bincount(labels, minlength=10))


def test_noise_and_blank_paper_score_near_chance():
    labels = np.repeat(np.arange(10), 20)
    noise = np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    assert digits.evaluate(noise, labels)["accuracy"] <= 0.25
    blank = np.ones((200, 32, 32, 3), np.float32)
    assert digits.evaluate(blank, labels)["accuracy"] <= 0.2  # one reading for all: at most one digit right


def test_evaluation_input_errors():
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        digits.ink_features(np.full((1, 32, 32, 3), -1.0))
    with pytest.raises(ValueError, match=r"must be \[N, H, W, 3\]"):
        digits.ink_features(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="multiples of 8"):
        digits.ink_features(np.zeros((1, 30, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="one label per image"):
        digits.evaluate(np.zeros((2, 32, 32, 3), np.uint8), [1])
    with pytest.raises(ValueError, match=r"labels must be digits 0..9, got values in \[1, 10\]"):
        digits.evaluate(np.zeros((2, 32, 32, 3), np.uint8), [1, 10])


class FakePipeline:
    """Answers each prompt with a real digit (shifted by `shift`), after checking that the call's
    arguments are LuminaPipeline's."""

    def __init__(self, real_digits, shift: int = 0):
        self.examples = {d: real_digits.images[real_digits.target == d] for d in range(10)}
        self.shift, self.calls = shift, []

    def __call__(self, **kwargs):
        inspect.signature(LuminaPipeline.__call__).bind(None, **kwargs)
        self.calls.append(kwargs)
        assert kwargs["height"] == kwargs["width"] == 32 and kwargs["output_type"] == "np"
        drawn = []
        for i, prompt in enumerate(kwargs["prompt"]):
            (digit,) = named_digits(prompt)
            drawn.append(digits.render(self.examples[(digit + self.shift) % 10][i], 32) / 255.0)
        return type("Output", (), {"images": np.stack(drawn)})


def test_evaluate_pipeline_scores_what_the_prompts_ask_for(real_digits):
    pipe = FakePipeline(real_digits)
    result = digits.evaluate_pipeline(pipe, samples_per_digit=5, steps=7, guidance=2.0)
    assert result["accuracy"] >= 0.95
    assert np.asarray(result["confusion"]).sum(1).tolist() == [5] * 10
    assert len(pipe.calls) == 10 and len({c["seed"] for c in pipe.calls}) == 10
    assert {(c["num_inference_steps"], c["guidance_scale"]) for c in pipe.calls} == {(7, 2.0)}
    prompts = [p for c in pipe.calls for p in c["prompt"]]
    assert len(set(prompts)) > 10  # varied wording

    wrong = digits.evaluate_pipeline(FakePipeline(real_digits, shift=1), samples_per_digit=5)
    assert wrong["accuracy"] <= 0.1
    confusion = np.asarray(wrong["confusion"])
    assert np.diagonal(np.roll(confusion, -1, axis=1)).sum() >= 45  # read as the next digit
