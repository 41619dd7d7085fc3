"""Hugging Face hub ids wherever lumina-jax takes a path: "Alpha-VLLM/Lumina-Next-SFT-diffusers" loads
as its download folder would.

Why our own step before the loaders rather than `snapshot_download` of the whole repo: the released
repos carry several copies of the same weights (.bin beside .safetensors, fp16 variants, EMA and
non-EMA checkpoints), tens of GB we would never read. So we list the repo's files, choose the ones
the loader reads (`choose_files`, a pure function of the file list), and download only those into
the standard Hugging Face cache. huggingface_hub itself honours HF_TOKEN, HF_HOME, HF_HUB_CACHE and
HF_HUB_OFFLINE; offline, or when the hub cannot be reached, the cached snapshot is used. The loaders
then read the snapshot folder like any local folder, and check it as strictly.

An existing local path always wins, and only a `str` can be an id: a `Path` is always local.
huggingface_hub is imported only when an id is resolved.
"""

import logging
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

# What the caller loads: "pipeline_or_transformer" is `python -m convert`'s choice (a pipeline if
# the repo is one, else transformer weights).
Kind = Literal["pipeline", "pipeline_or_transformer", "transformer", "text_encoder", "tokenizer", "vae"]
# Each component's weights file stem, in a pipeline's subfolder or in a model repo of its own.
WEIGHTS_STEMS = {"transformer": "diffusion_pytorch_model", "text_encoder": "model", "vae": "diffusion_pytorch_model"}
PIPELINE_COMPONENTS = tuple(WEIGHTS_STEMS)
PIPELINE_FOLDERS_COPIED_WHOLE = ("scheduler/", "tokenizer/")
# A tokenizer's files beside a text encoder of its own (a transformers model repo such as meta-llama/Llama-2-7b-hf).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
ORIGINAL_CHECKPOINT = re.compile(r"consolidated(_ema)?\.\d+-of-\d+\.(safetensors|pth)")
# The hub's rule (huggingface_hub.utils.validate_repo_id), with the owner required.
_REPO_ID = re.compile(r"\b[\w.-]{1,96}\b/\b[\w.-]{1,96}\b")
_WHAT = {  # what a repo of each kind holds, in messages; family-neutral, as every registered family loads
    "transformer": "a Lumina pipeline or diffusion transformer",
    "text_encoder": "a Lumina pipeline or text encoder",
    "tokenizer": "a Lumina pipeline or a text encoder with its tokenizer",
    "vae": "a Lumina pipeline or VAE",
}


def is_repo_id(text: str) -> bool:
    """Whether `text` reads as a hub model id, "owner/name"."""
    return bool(_REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text


def local_path(
    path_or_id: str | os.PathLike,
    kind: Kind,
    *,
    revision: str | None = None,
    ema: bool = False,
    components: Iterable[str] = PIPELINE_COMPONENTS,
) -> Path:
    """The local file or folder to load `path_or_id` from: itself if it exists or is not a `str` reading as
    "owner/name", else the Hugging Face cache's snapshot of that hub repo at `revision`, with the files
    that a `kind` loader reads downloaded (see `choose_files`; `ema` and `components` as there)."""
    if not isinstance(path_or_id, str) or os.path.exists(path_or_id) or not is_repo_id(path_or_id):
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for Hugging Face hub ids; {path_or_id} is a local path")
        return Path(path_or_id)
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    choose = dict(kind=kind, ema=ema, components=tuple(components))
    if constants.HF_HUB_OFFLINE:
        return _cached_snapshot(path_or_id, revision, choose, reason="HF_HUB_OFFLINE is set")
    try:
        files = HfApi().list_repo_files(path_or_id, revision=revision)
    except GatedRepoError:
        raise PermissionError(
            f"{path_or_id} is gated on the Hugging Face hub: accept its conditions on "
            f"https://huggingface.co/{path_or_id}, then set HF_TOKEN to a token of that account"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{path_or_id} has no revision {revision!r} on the Hugging Face hub") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{path_or_id}: no such local path, and no model {path_or_id} on the Hugging Face hub "
            "(if it is private, set HF_TOKEN to a token that can read it)"
        ) from None
    except _unreachable_errors() as error:
        logger.warning(f"the Hugging Face hub could not be reached ({error!r}); looking for {path_or_id} in its cache")
        return _cached_snapshot(path_or_id, revision, choose, reason=f"the hub could not be reached ({error!r})")
    chosen = choose_files(path_or_id, files, **choose)
    return Path(snapshot_download(path_or_id, revision=revision, allow_patterns=chosen))


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """What failing to reach the hub raises: an OSError (requests' errors, and huggingface_hub's HTTP and
    offline-mode errors) or a transport error of the httpx client that newer huggingface_hub uses."""
    clients = [sys.modules[name] for name in ("httpx", "httpx2") if name in sys.modules]
    return (OSError, *(client.TransportError for client in clients))


def _cached_snapshot(repo_id: str, revision: str | None, choose: dict, *, reason: str) -> Path:
    """The cached snapshot of `repo_id`, checked to be the kind asked for; its files are checked by the loaders."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        # An empty allow list, for huggingface_hub would otherwise check the snapshot against its cached
        # listing of the whole repo, and we download only some files; the loaders check those they read.
        snapshot = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=[]))
    except LocalEntryNotFoundError:
        at = "" if revision is None else f" at revision {revision!r}"
        raise FileNotFoundError(
            f"{repo_id}: no such local path, and not in the Hugging Face cache{at} (HF_HUB_CACHE="
            f"{constants.HF_HUB_CACHE}), and {reason}; run once online, or download it with `hf download {repo_id}`"
        ) from None
    files = [path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if not path.is_dir()]
    choose_files(repo_id, files, **choose)
    return snapshot


def choose_files(
    repo_id: str,
    files: Iterable[str],
    kind: Kind,
    *,
    ema: bool = False,
    components: Iterable[str] = PIPELINE_COMPONENTS,
) -> list[str]:
    """Of a hub repo's files, the ones a `kind` loader reads; ValueError if the repo is not of that kind.

    A diffusers pipeline (model_index.json): its scheduler/ and tokenizer/, and for each of
    `components` (its transformer/ also for a "transformer", and so on) config.json with the weights:
    `<stem>.safetensors`, or the index `<stem>.safetensors.index.json` with its shards
    `<stem>-NNNNN-of-NNNNN.safetensors`, or the params/ of a folder written by `python -m convert`;
    never .bin files nor variants such as `<stem>.fp16.safetensors`. An original Lumina-Next checkpoint:
    consolidated.00-of-01 (consolidated_ema with `ema`) .safetensors, else .pth, with model_args.pth.
    A model repo of its own (config.json): config.json with the weights as above. A "tokenizer": a
    pipeline's tokenizer/, or the tokenizer files of a model repo. Missing weights are left to the
    loaders to report.
    """
    files = set(files)
    if kind == "tokenizer":
        chosen = sorted(f for f in files if f.startswith("tokenizer/")) if "model_index.json" in files else []
        chosen = chosen or [name for name in TOKENIZER_FILES if name in files]
        if not chosen:
            raise ValueError(f"{repo_id} is not {_WHAT[kind]}: it has no tokenizer files (its files: {_some(files)})")
        return chosen
    if "model_index.json" in files:
        if kind in ("pipeline", "pipeline_or_transformer"):
            return _pipeline_files(repo_id, files, tuple(components))
        if not any(f.startswith(f"{kind}/") for f in files):
            raise ValueError(f"{repo_id}: a diffusers pipeline without {kind}/ (its folders: {_folders(files)})")
        return ["model_index.json", *_component_files(files, f"{kind}/", WEIGHTS_STEMS[kind])]
    if kind == "pipeline":
        raise ValueError(f"{repo_id} is not a Lumina pipeline: it has no model_index.json (its files: {_some(files)})")
    kind = "transformer" if kind == "pipeline_or_transformer" else kind
    if kind == "transformer" and any(ORIGINAL_CHECKPOINT.fullmatch(f) for f in files):
        return _original_files(repo_id, files, ema)
    if "config.json" in files:
        return _component_files(files, "", WEIGHTS_STEMS[kind])
    original = ", consolidated.00-of-01 checkpoint" if kind == "transformer" else ""
    raise ValueError(
        f"{repo_id} is not {_WHAT[kind]}: it has no model_index.json{original} or config.json "
        f"(its files: {_some(files)})"
    )


def _pipeline_files(repo_id: str, files: set[str], components: tuple[str, ...]) -> list[str]:
    needed = ["text_encoder", "tokenizer", *(["transformer"] if "transformer" in components else [])]
    missing = [name for name in needed if not any(f.startswith(f"{name}/") for f in files)]
    if missing:
        raise ValueError(
            f"{repo_id} is a diffusers pipeline but not a Lumina one: it has no {', '.join(m + '/' for m in missing)} "
            f"(its folders: {_folders(files)})"
        )
    chosen = ["model_index.json", *sorted(f for f in files if f.startswith(PIPELINE_FOLDERS_COPIED_WHOLE))]
    for name in components:  # the VAE is absent from pixel-space pipelines
        chosen += _component_files(files, f"{name}/", WEIGHTS_STEMS[name])
    return chosen


def _component_files(files: set[str], folder: str, stem: str) -> list[str]:
    """config.json and the weights of one model in `folder` ("" or "name/"), as the loaders read them."""
    config = [f"{folder}config.json"] if f"{folder}config.json" in files else []
    if f"{folder}{stem}.safetensors" in files:
        return config + [f"{folder}{stem}.safetensors"]
    if f"{folder}{stem}.safetensors.index.json" in files:
        shard = re.compile(re.escape(f"{folder}{stem}-") + r"\d+-of-\d+\.safetensors")
        return config + [f"{folder}{stem}.safetensors.index.json", *sorted(filter(shard.fullmatch, files))]
    return config + sorted(f for f in files if f.startswith(f"{folder}params/"))


def _original_files(repo_id: str, files: set[str], ema: bool) -> list[str]:
    stem = "consolidated_ema.00-of-01" if ema else "consolidated.00-of-01"
    for suffix in (".safetensors", ".pth"):
        if stem + suffix in files:
            return [stem + suffix, *(["model_args.pth"] if "model_args.pth" in files else [])]
    found = sorted(filter(ORIGINAL_CHECKPOINT.fullmatch, files))
    raise ValueError(
        f"{repo_id}: an original Lumina-Next checkpoint without {stem}.safetensors or .pth (it has {', '.join(found)})"
    )


def _folders(files: set[str]) -> str:
    return ", ".join(sorted({f.split("/")[0] + "/" for f in files if "/" in f})) or "none"


def _some(files: set[str], count: int = 8) -> str:
    names = sorted(files)
    return ", ".join(names[:count]) + (f", ... ({len(names) - count} more)" if len(names) > count else "") or "none"
