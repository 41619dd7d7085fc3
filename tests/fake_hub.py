"""Repos laid out by hand in a Hugging Face hub cache (the `hub_cache` fixture of conftest.py), as a download
lays them out: hub ids resolve to what a test puts there."""

import hashlib
import os
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, source: Path, *, revision: str = REVISION, ref: str = "main") -> Path:
    """Put `source`'s files in the cache as a download lays them out: content-addressed blobs, the
    snapshot of symlinks to them, and `ref` naming the commit. Returns the snapshot folder."""
    source = Path(source)  # a local folder; `loop.train` returns exports as etils paths, whose rglob refuses "**"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(revision)
    return snapshot
