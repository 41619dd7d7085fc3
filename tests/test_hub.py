"""Hugging Face hub ids wherever a path is taken, offline: repos are laid out by hand in a hub cache in
tmp_path (blobs, snapshot symlinks, refs) and huggingface_hub is pointed at it."""

import shutil
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
from fake_hub import REVISION, cache_repo
from flax import nnx
from huggingface_hub import constants
from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from PIL import Image

from lumina_jax import LuminaPipeline, hub, load_text_encoder, load_transformer, load_vae
from lumina_jax.assets import DIGITS_MODEL as DIGITS
from lumina_jax.cli.convert import main as convert_main
from lumina_jax.cli.sample import main as sample_main

ORIGINAL = Path(__file__).parent / "fixtures" / "lumina_next_original_tiny"
OTHER_REVISION = "89abcdef0123456789abcdef0123456789abcdef"


def params(module: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def assert_same_params(a: nnx.Module, b: nnx.Module) -> None:
    jax.tree.map(np.testing.assert_array_equal, params(a), params(b))


# choose_files: from a repo's file list to the files a loader reads


def test_a_pipeline_downloads_plain_safetensors_only():
    files = [
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer.model",
        "tokenizer/special_tokens_map.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.bin",
        "transformer/diffusion_pytorch_model.safetensors",
        "transformer/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/model.fp16.safetensors.index.json",
        "text_encoder/pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.bin",
    ]
    assert hub.choose_files("org/pipe", files, "pipeline") == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer.model",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    # one component of the pipeline, or the pipeline without its transformer
    assert hub.choose_files("org/pipe", files, "vae") == [
        "model_index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    without = hub.choose_files("org/pipe", files, "pipeline", components=("text_encoder", "vae"))
    assert not any(f.startswith("transformer/") for f in without) and "vae/config.json" in without
    assert hub.choose_files("org/pipe", files, "pipeline_or_transformer") == hub.choose_files(
        "org/pipe", files, "pipeline"
    )


def test_a_pipeline_with_bin_weights_alone_downloads_their_configs():
    """The loader then names the missing safetensors file; nothing it cannot read is downloaded."""
    files = [
        "model_index.json",
        "tokenizer/tokenizer.json",
        "text_encoder/config.json",
        "text_encoder/pytorch_model.bin",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.bin",
    ]
    assert hub.choose_files("org/pipe", files, "pipeline") == [
        "model_index.json",
        "tokenizer/tokenizer.json",
        "transformer/config.json",
        "text_encoder/config.json",
    ]


def test_original_checkpoints_ema_or_not():
    files = [
        "README.md",
        "consolidated.00-of-01.pth",
        "consolidated.00-of-01.safetensors",
        "consolidated_ema.00-of-01.pth",
        "model_args.pth",
        "samples/fox.png",
    ]
    assert hub.choose_files("org/next", files, "transformer") == ["consolidated.00-of-01.safetensors", "model_args.pth"]
    # .pth only where there is no safetensors file
    assert hub.choose_files("org/next", files, "transformer", ema=True) == [
        "consolidated_ema.00-of-01.pth",
        "model_args.pth",
    ]
    assert hub.choose_files("org/next", files, "pipeline_or_transformer") == hub.choose_files(
        "org/next", files, "transformer"
    )
    with pytest.raises(ValueError, match=r"org/next: .* without consolidated_ema.00-of-01.safetensors or .pth"):
        hub.choose_files("org/next", ["consolidated.00-of-01.pth"], "transformer", ema=True)


def test_model_repos_of_their_own():
    transformer = [
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
        "diffusion_pytorch_model.bin",
    ]
    assert hub.choose_files("org/dit", transformer, "transformer") == transformer[:4]  # not the .bin
    gemma = ["config.json", "model.safetensors", "gemma-2b.gguf", "tokenizer.json", "generation_config.json"]
    assert hub.choose_files("org/gemma", gemma, "text_encoder") == ["config.json", "model.safetensors"]
    converted = ["config.json", "params/_METADATA", "params/d/0123", "README.md"]
    assert hub.choose_files("org/ours", converted, "vae") == ["config.json", "params/_METADATA", "params/d/0123"]


@pytest.mark.parametrize(
    "files, kind, message",
    [
        (
            ["README.md", "weights.ckpt"],
            "transformer",
            r"org/x is not a Lumina pipeline or diffusion transformer: it has no model_index.json, "
            r"consolidated.00-of-01 checkpoint or config.json \(its files: README.md, weights.ckpt\)",
        ),
        (["config.json", "model.safetensors"], "pipeline", r"org/x is not a Lumina pipeline: it has no model_index"),
        (
            ["model_index.json", "unet/config.json", "text_encoder/config.json", "vae/config.json"],
            "pipeline",
            r"org/x is a diffusers pipeline but not a Lumina one: it has no tokenizer/, transformer/ \(its folders: "
            r"text_encoder/, unet/, vae/\)",
        ),
        (["model_index.json", "transformer/config.json"], "vae", r"org/x: a diffusers pipeline without vae/"),
        (
            [f"file{i}.txt" for i in range(12)],
            "text_encoder",
            r"org/x is not a Lumina pipeline or text encoder: .*file5.txt, \.\.\. \(4 more\)\)$",
        ),
    ],
)
def test_other_repos_are_refused(files, kind, message):
    with pytest.raises(ValueError, match=message):
        hub.choose_files("org/x", files, kind)


@pytest.mark.parametrize(
    "text, is_id",
    [
        ("Alpha-VLLM/Lumina-Next-SFT-diffusers", True),
        ("org/name_1.5", True),
        ("name", False),
        ("a/b/c", False),
        ("/abs/path", False),
        ("./relative", False),
        ("org/", False),
        ("org/-name", False),
        ("org/na--me", False),
        ("~/models", False),
        ("org/" + "x" * 97, False),
    ],
)
def test_what_reads_as_a_hub_id(text, is_id):
    assert hub.is_repo_id(text) == is_id


# Loading by id, from the cache


def test_from_pretrained_by_id_is_the_local_folder(hub_cache):
    snapshot = cache_repo(hub_cache, "lumina-jax/digits", DIGITS)
    assert hub.local_path("lumina-jax/digits", "pipeline") == snapshot  # the cache in tmp_path, no other
    by_id = LuminaPipeline.from_pretrained("lumina-jax/digits", dtype="float32", progress=False)
    local = LuminaPipeline.from_pretrained(DIGITS, dtype="float32", progress=False)
    assert_same_params(by_id.transformer, local.transformer)
    assert_same_params(by_id.text_encoder, local.text_encoder)
    assert by_id.vae is None and by_id.scheduler_shift == local.scheduler_shift
    assert by_id.tokenizer("draw a three").input_ids == local.tokenizer("draw a three").input_ids
    encoders_only = LuminaPipeline.from_pretrained("lumina-jax/digits", transformer=None, progress=False)
    assert encoders_only.transformer is None


def test_load_transformer_by_id_and_revision(hub_cache):
    cache_repo(hub_cache, "alpha/next-tiny", ORIGINAL)
    # another commit, on a branch, whose plain checkpoint is the EMA one
    other = hub_cache / "other"
    other.mkdir()
    shutil.copy(ORIGINAL / "consolidated_ema.00-of-01.safetensors", other / "consolidated.00-of-01.safetensors")
    shutil.copy(ORIGINAL / "model_args.pth", other)
    cache_repo(hub_cache, "alpha/next-tiny", other, revision=OTHER_REVISION, ref="ema-as-plain")

    local = load_transformer(ORIGINAL, progress=False)
    local_ema = load_transformer(ORIGINAL, ema=True, progress=False)
    assert_same_params(load_transformer("alpha/next-tiny", progress=False), local)
    assert_same_params(load_transformer("alpha/next-tiny", ema=True, progress=False), local_ema)
    assert_same_params(load_transformer("alpha/next-tiny", revision=REVISION, progress=False), local)
    assert_same_params(load_transformer("alpha/next-tiny", revision="ema-as-plain", progress=False), local_ema)
    with pytest.raises(FileNotFoundError, match=r"alpha/next-tiny: .*not in the Hugging Face cache at revision 'v2'"):
        load_transformer("alpha/next-tiny", revision="v2", progress=False)


def test_text_encoder_and_vae_by_id(hub_cache, tmp_path):
    from diffusers import AutoencoderKL  # only this test needs torch

    cache_repo(hub_cache, "lumina-jax/digits", DIGITS)
    assert_same_params(
        load_text_encoder("lumina-jax/digits", progress=False),
        load_text_encoder(DIGITS / "text_encoder", progress=False),
    )
    AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4).save_pretrained(tmp_path / "vae")
    cache_repo(hub_cache, "org/tiny-vae", tmp_path / "vae")
    assert_same_params(load_vae("org/tiny-vae", progress=False), load_vae(tmp_path / "vae", progress=False))
    with pytest.raises(ValueError, match=r"lumina-jax/digits: a diffusers pipeline without vae/"):
        load_vae("lumina-jax/digits", progress=False)


def test_convert_by_id(hub_cache, tmp_path, capsys):
    cache_repo(hub_cache, "lumina-jax/digits", DIGITS)
    assert convert_main(["lumina-jax/digits", str(tmp_path / "converted")]) == 0
    assert "wrote" in capsys.readouterr().out
    converted = LuminaPipeline.from_pretrained(tmp_path / "converted", dtype="float32", progress=False)
    assert (tmp_path / "converted" / "transformer" / "params").is_dir()
    assert_same_params(converted.transformer, load_transformer(DIGITS, progress=False))
    assert_same_params(converted.text_encoder, load_text_encoder(DIGITS, progress=False))

    cache_repo(hub_cache, "alpha/next-tiny", ORIGINAL)
    assert convert_main(["alpha/next-tiny", str(tmp_path / "ema"), "--ema", "--revision", REVISION]) == 0
    assert_same_params(
        load_transformer(tmp_path / "ema", progress=False), load_transformer(ORIGINAL, ema=True, progress=False)
    )


def test_sample_by_id(hub_cache, tmp_path):
    """The issue's finish line: `python -m sample --model ORG/NAME --prompts-file prompts.jsonl` on a hub cache."""
    cache_repo(hub_cache, "lumina-jax/digits", DIGITS)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a handwritten seven"}\n{"prompt": "a handwritten two", "seed": 4}\n')
    settings = ["--prompts-file", str(prompts), "--steps", "2", "--dtype", "float32"]
    assert sample_main(["--model", "lumina-jax/digits", *settings, "--out", str(tmp_path / "by-id")]) == 0
    assert sample_main(["--model", str(DIGITS), *settings, "--out", str(tmp_path / "local")]) == 0
    for name in ("00000_0.png", "00001_4.png"):
        by_id, local = (np.asarray(Image.open(tmp_path / out / name)) for out in ("by-id", "local"))
        np.testing.assert_array_equal(by_id, local)
    assert Image.open(tmp_path / "by-id" / "00000_0.png").text["model"] == "lumina-jax/digits"


def test_a_local_folder_named_like_the_id_wins(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ORIGINAL, tmp_path / "alpha" / "next-tiny")  # the cache has no such repo
    assert hub.local_path("alpha/next-tiny", "transformer") == Path("alpha/next-tiny")
    assert_same_params(load_transformer("alpha/next-tiny", progress=False), load_transformer(ORIGINAL, progress=False))
    with pytest.raises(ValueError, match=r"revision='main' is for Hugging Face hub ids; alpha/next-tiny is a local"):
        load_transformer("alpha/next-tiny", revision="main", progress=False)


# Errors


def test_offline_and_not_cached(hub_cache, capsys):
    with pytest.raises(FileNotFoundError) as error:
        LuminaPipeline.from_pretrained("Alpha-VLLM/Lumina-Next-SFT-diffusers")
    message = str(error.value)
    assert "Alpha-VLLM/Lumina-Next-SFT-diffusers: no such local path, and not in the Hugging Face cache" in message
    assert f"HF_HUB_CACHE={hub_cache}" in message and "HF_HUB_OFFLINE is set" in message
    assert "hf download Alpha-VLLM/Lumina-Next-SFT-diffusers" in message
    assert sample_main(["--model", "Alpha-VLLM/Lumina-Next-SFT-diffusers", "--prompt", "a fox"]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err


def test_a_cached_repo_that_is_not_lumina(hub_cache, tmp_path):
    other = tmp_path / "other"
    (other / "unet").mkdir(parents=True)
    (other / "README.md").write_text("a text classifier")
    (other / "unet" / "config.json").write_text("{}")
    cache_repo(hub_cache, "org/other", other)
    with pytest.raises(
        ValueError,
        match=r"org/other is not a Lumina pipeline: it has no model_index.json \(its files: "
        r"README.md, unet/config.json\)",
    ):
        LuminaPipeline.from_pretrained("org/other")
    with pytest.raises(ValueError, match=r"org/other is not a Lumina pipeline or diffusion transformer"):
        load_transformer("org/other")
    assert convert_main(["org/other", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize(
    "missing, message",
    [
        (
            "transformer/diffusion_pytorch_model.safetensors",
            r"snapshots/0123456789abcdef0123456789abcdef01234567/transformer: config.json but no "
            r"diffusion_pytorch_model.safetensors",
        ),
        (
            "transformer/config.json",
            r"/transformer: no Next-DiT, Flag-DiT or Unified Next-DiT weights found \(no config.json\)",
        ),
        ("text_encoder/model.safetensors", r"/text_encoder: config.json but no model.safetensors"),
    ],
)
def test_a_file_missing_from_the_cached_snapshot_is_named(hub_cache, missing, message):
    snapshot = cache_repo(hub_cache, "lumina-jax/digits", DIGITS)
    (snapshot / missing).unlink()
    with pytest.raises(ValueError, match=message):
        LuminaPipeline.from_pretrained("lumina-jax/digits", progress=False)


def test_a_listing_of_the_whole_repo_in_the_cache_does_not_ask_for_files_never_downloaded(hub_cache):
    """Newer huggingface_hub caches the repo's full file listing and, offline, refuses a snapshot that
    misses any file of it, unless told which files are wanted: ours miss the .bin and fp16 ones."""
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")
    snapshot = cache_repo(hub_cache, "lumina-jax/digits", DIGITS)
    listing = {f.relative_to(snapshot).as_posix(): f.stat().st_size for f in snapshot.rglob("*") if f.is_file()}
    listing |= dict.fromkeys(["transformer/diffusion_pytorch_model.bin", "text_encoder/model.fp16.safetensors"], 10)
    entries = {path: tree_cache.TreeCacheEntry(size=size, blob_id="0" * 40) for path, size in listing.items()}
    tree_cache.write_tree_cache(str(snapshot.parents[1]), REVISION, entries)
    assert huggingface_hub.get_cached_repo_tree("lumina-jax/digits")  # the listing is where huggingface_hub looks
    assert hub.local_path("lumina-jax/digits", "pipeline") == snapshot


# Online, with huggingface_hub's calls replaced: what is asked of the hub, and how its refusals read


@pytest.fixture
def online(hub_cache, monkeypatch):
    """Online, the hub's listing and downloads replaced; returns the recorded snapshot_download calls."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    downloads, cached = [], huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **options):
        if options.get("local_files_only"):
            return cached(repo_id, **options)
        downloads.append((repo_id, options))
        return str(hub_cache / "downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return downloads


def hub_error(kind: type[Exception]) -> Exception:
    error = kind.__new__(kind)  # without the HTTP response their constructors want
    Exception.__init__(error, "refused")
    return error


def test_online_downloads_the_chosen_files_at_the_revision(online, monkeypatch, hub_cache):
    listing = ["consolidated.00-of-01.pth", "consolidated_ema.00-of-01.pth", "model_args.pth"]
    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, **kw: asked.append(kw) or listing)
    path = hub.local_path("alpha/next", "transformer", revision="v1", ema=True)
    assert path == hub_cache / "downloaded" and asked == [{"revision": "v1"}]
    assert online == [
        ("alpha/next", {"revision": "v1", "allow_patterns": ["consolidated_ema.00-of-01.pth", "model_args.pth"]})
    ]


@pytest.mark.parametrize(
    "error, kind, message",
    [
        (
            GatedRepoError,
            PermissionError,
            r"alpha/gated is gated on the Hugging Face hub: accept its conditions on "
            r"https://huggingface.co/alpha/gated, then set HF_TOKEN",
        ),
        (
            RepositoryNotFoundError,
            FileNotFoundError,
            r"alpha/gated: no such local path, and no model alpha/gated on "
            r"the Hugging Face hub \(if it is private, set HF_TOKEN",
        ),
        (RevisionNotFoundError, FileNotFoundError, r"alpha/gated has no revision 'v9' on the Hugging Face hub"),
        (
            ConnectionError,
            FileNotFoundError,
            r"not in the Hugging Face cache at revision 'v9' .* and the hub could "
            r"not be reached \(ConnectionError\('refused'\)\)",
        ),
    ],
)
def test_refusals_of_the_hub_read_well(online, monkeypatch, error, kind, message):
    def refuse(self, repo_id, **options):
        raise hub_error(error)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", refuse)
    with pytest.raises(kind, match=message):
        hub.local_path("alpha/gated", "pipeline", revision="v9")
    assert online == []


def test_an_unreachable_hub_falls_back_to_the_cache(online, monkeypatch, hub_cache):
    snapshot = cache_repo(hub_cache, "lumina-jax/digits", DIGITS)
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client: its errors are no OSErrors

    def unreachable(self, repo_id, **options):
        raise httpx2.ConnectError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    assert hub.local_path("lumina-jax/digits", "pipeline") == snapshot
    assert online == []


def test_a_tokenizer_comes_from_a_pipeline_or_from_beside_its_model():
    llama = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "x.bin"]
    assert hub.choose_files("org/llama", llama, "tokenizer") == [
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    pipeline = ["model_index.json", "tokenizer/tokenizer.json", "tokenizer/special_tokens_map.json", "vae/config.json"]
    assert hub.choose_files("org/pipe", pipeline, "tokenizer") == sorted(pipeline[1:3])
    with pytest.raises(ValueError, match="org/vae is not a Lumina pipeline or a text encoder with its tokenizer"):
        hub.choose_files("org/vae", ["config.json", "diffusion_pytorch_model.safetensors"], "tokenizer")
