"""Batch sampling jobs: prompts files, one job per image, batches over every local device, and outputs
that let a killed run resume.

A job is one image: (prompt, negative prompt, seed, size, guidance, steps). Jobs of the same settings
run together, `per_call` at a time; a short last batch is padded with repeats of its last job, so
every call of a setting has one shape and one compiled program. An image depends on its job alone,
not on the batch it ran in (per-image noise and captions), so any device or process count draws the
same images. Its file name comes from its request's line and its seed, it is written atomically with
its settings, and a rerun with `skip_existing` draws only what is missing or was drawn with other
settings. On several processes (jax.distributed) each takes every n-th job.
"""

import dataclasses
import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

# A request (a line of a prompts file) and the type of each of its fields.
REQUEST_FIELDS = {
    "prompt": str,
    "negative_prompt": (str, type(None)),
    "seed": int,
    "height": (int, type(None)),
    "width": (int, type(None)),
    "guidance": (int, float),
    "steps": int,
    "num_images": int,
}
MAX_SEED = 2**32 - 1  # seeds are uint32 keys
MAX_IMAGES = 1_000_000  # a run's jobs are built up front, in memory: a larger one is split into several runs


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to draw."""

    line: int  # the request's index in the prompts file (0-based, blank lines not counted)
    prompt: str
    negative_prompt: str | None
    seed: int
    height: int
    width: int
    guidance: float
    steps: int

    @property
    def file_name(self) -> str:
        return f"{self.line:05d}_{self.seed}.png"

    @property
    def settings(self) -> tuple:
        """What a batch shares: one compiled program (and one guidance scale) per settings."""
        return (self.height, self.width, self.steps, self.guidance)


def read_requests(path: Path) -> list[dict]:
    """The requests of a prompts file: plain text, one prompt a line; JSONL (a `.jsonl` file, or one whose
    first line is a JSON object) with per-line `prompt` and any of REQUEST_FIELDS; or a JSON array (a
    `.json` file, or text that parses as one) of prompts or of such objects. A UTF-8 BOM is dropped."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise FileNotFoundError(f"--prompts-file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected UTF-8 text, JSONL or a JSON array)") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path} has no prompts")
    suffix, first = Path(path).suffix, lines[0][1]
    if suffix == ".json" or first.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            if suffix == ".json" and not first.startswith("{"):
                raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
            items = None  # JSONL named .json, or a plain prompt that starts with "["
        if isinstance(items, list):
            if not items:
                raise ValueError(f"{path} has no prompts")
            return [
                _request({"prompt": item} if isinstance(item, str) else item, f"{path}: item {i}")
                for i, item in enumerate(items)
            ]
    if suffix not in (".jsonl", ".json") and not first.startswith("{"):
        return [{"prompt": line} for _, line in lines]
    requests = []
    for number, line in lines:
        try:
            request = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
        requests.append(_request(request, f"{path}:{number}"))
    return requests


def _request(request, where: str) -> dict:
    """A request as read (a JSON value), checked: an object with a "prompt" and REQUEST_FIELDS of their types."""
    if not isinstance(request, dict):
        raise ValueError(f'{where}: expected a JSON object with a "prompt", got {json.dumps(request)[:60]}')
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; allowed: {', '.join(REQUEST_FIELDS)}")
    if "prompt" not in request:
        raise ValueError(f'{where}: no "prompt"')
    for name, value in request.items():
        kinds = REQUEST_FIELDS[name]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ValueError(f'{where}: "{name}" must be {_kind_name(kinds)}, got {value!r}')
        if isinstance(value, str) and (error := text_error(value)):
            raise ValueError(f'{where}: "{name}" {error}')
    return request


def text_error(text: str) -> str | None:
    """Why tokenizers would refuse `text` (None if they would not): UTF-8 cannot encode the surrogates
    that stand for undecodable bytes of command-line arguments, or JSON's lone \\ud800 escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{text!r:.60} is not UTF-8 text ({e.reason} at character {e.start})"
    return None


def _kind_name(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {str: "a string", int: "an integer", float: "a number", type(None): "null"}
    return " or ".join(names[k] for k in kinds if not (k is int and float in kinds))


def make_jobs(requests: list[dict], defaults: dict) -> list[Job]:
    """One job per image: each request's fields (but nulls) over `defaults` (the REQUEST_FIELDS but prompt);
    num_images n draws seeds seed, seed + 1, ..., seed + n - 1. At most MAX_IMAGES in all."""
    jobs = []
    requests = [{name: value for name, value in request.items() if value is not None} for request in requests]
    images = sum(max(request.get("num_images", defaults["num_images"]), 0) for request in requests)
    if images > MAX_IMAGES:
        raise ValueError(f"{images} images in one run; at most {MAX_IMAGES}: split the prompts into several runs")
    for line, request in enumerate(requests):
        fields = {**defaults, **request}
        where = f"request {line} ({fields['prompt'][:40]!r})"
        if fields["num_images"] < 1:
            raise ValueError(f"{where}: num_images must be at least 1, got {fields['num_images']}")
        if fields["steps"] < 1:
            raise ValueError(f"{where}: steps must be at least 1, got {fields['steps']}")
        if not (math.isfinite(fields["guidance"]) and fields["guidance"] >= 0):
            raise ValueError(f"{where}: guidance must be >= 0 (1 or less turns it off), got {fields['guidance']}")
        if not 0 <= fields["seed"] <= MAX_SEED - fields["num_images"] + 1:
            raise ValueError(
                f"{where}: seeds must lie in [0, {MAX_SEED}], got seed {fields['seed']} "
                f"with {fields['num_images']} images"
            )
        for i in range(fields["num_images"]):
            jobs.append(
                Job(
                    line,
                    fields["prompt"],
                    fields["negative_prompt"],
                    fields["seed"] + i,
                    fields["height"],
                    fields["width"],
                    float(fields["guidance"]),
                    fields["steps"],
                )
            )
    return jobs


def batches(jobs: list[Job], per_call: int) -> Iterator[tuple[list[Job], int]]:
    """Jobs grouped by settings (in order of first appearance), `per_call` at a time: (batch, how many
    are real), the short last batch of a settings padded with repeats of its last job."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.settings, []).append(job)
    for group in groups.values():
        for start in range(0, len(group), per_call):
            batch = group[start : start + per_call]
            yield batch + [batch[-1]] * (per_call - len(batch)), len(batch)


def write_png(image: Image.Image, path: Path, metadata: dict) -> None:
    """Save with the settings in its text chunks, atomically: a kill never leaves a partial `path`."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(metadata))
    for key, value in metadata.items():
        info.add_text(key, str(value))
    # Not named *.png: whoever globs the folder while we write sees whole images only.
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        image.save(partial, format="PNG", pnginfo=info)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def index_name(process_index: int, process_count: int) -> str:
    return "index.jsonl" if process_count == 1 else f"index.{process_index}-of-{process_count}.jsonl"


@dataclasses.dataclass
class RunReport:
    written: int  # images drawn in this run
    skipped: int  # already there with the job's settings (skip_existing)
    seconds: float
    warm_images: int  # images of calls whose program was already compiled
    warm_seconds: float


def run_jobs(
    pipe,
    jobs: list[Job],
    out: Path,
    *,
    per_call: int,
    skip_existing: bool = False,
    metadata: dict | None = None,
    process_index: int = 0,
    process_count: int = 1,
    progress: bool = True,
    write: bool = True,
    **settings,
) -> RunReport:
    """Draw this process's share of `jobs` (every process_count-th, from process_index) into `out`,
    per_call images per pipeline call; `settings` are further pipeline arguments, `metadata` extra
    fields for each PNG. skip_existing: keep an image whose PNG records the job's settings (a file of
    the same name drawn otherwise, say before lines were inserted in the prompts file, is drawn again).
    Writes out/index.jsonl (index.I-of-N.jsonl with several processes) listing every image of the
    share that holds its settings. write=False draws and writes nothing: where one pipeline spans the devices
    of several processes, each of them makes the same calls and one writes."""
    mine = jobs[process_index::process_count]
    parameters = {job: {**_record(job), **(metadata or {}), **settings} for job in mine}
    if write:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.png.partial-*"):  # left by a killed run; only our own jobs' names
            if any(stale.name.startswith(f".{job.file_name}.partial-") for job in mine):
                stale.unlink(missing_ok=True)
    done = {job for job in mine if skip_existing and _holds(out / job.file_name, parameters[job])}
    todo = [job for job in mine if job not in done]
    report = RunReport(written=0, skipped=len(done), seconds=0.0, warm_images=0, warm_seconds=0.0)
    import jax  # here: `python -m sample` parses its arguments before it pays for importing JAX

    compilations = []  # JAX's compile events: a call without any ran compiled programs only
    listener = lambda event, seconds, **_: event.startswith("/jax/core/compile/") and compilations.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    bar = tqdm(total=len(todo), desc="sampling", unit="image", disable=not progress)
    started = time.perf_counter()
    try:
        for batch, real in batches(todo, per_call):
            height, width, steps, guidance = batch[0].settings
            start, compiled_before = time.perf_counter(), len(compilations)
            images = pipe(
                prompt=[job.prompt for job in batch],
                negative_prompt=[job.negative_prompt or "" for job in batch],
                seed=[job.seed for job in batch],
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                **settings,
            ).images
            for job, image in zip(batch[:real], images):
                if write:
                    write_png(image, out / job.file_name, parameters[job])
                done.add(job)
            if len(compilations) == compiled_before:
                report.warm_images += real
                report.warm_seconds += time.perf_counter() - start
            report.written += real
            bar.update(real)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        bar.close()
        report.seconds = time.perf_counter() - started
        if write:
            lines = [json.dumps({"file": job.file_name, **parameters[job]}) for job in mine if job in done]
            index = out / index_name(process_index, process_count)
            partial = index.with_name(f".{index.name}.partial-{uuid.uuid4().hex[:8]}")
            partial.write_text("".join(line + "\n" for line in lines))
            os.replace(partial, index)
    return report


def _holds(path: Path, parameters: dict) -> bool:
    """Whether `path` is a PNG that `write_png` wrote with these parameters."""
    try:
        with Image.open(path) as image:
            recorded = json.loads(image.info.get("parameters", "null"))
    except (OSError, ValueError):  # missing, not an image, or not our metadata
        return False
    return recorded == json.loads(json.dumps(parameters))  # as JSON reads back: a grid tuple is a list there


def _record(job: Job) -> dict:
    return {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt or "",
        "seed": job.seed,
        "height": job.height,
        "width": job.width,
        "guidance": job.guidance,
        "steps": job.steps,
    }
