"""Paths that may be in a bucket (gs://...), reached through etils.epath (gcsfs: pip install 'lumina-jax[gcs]').

A bucket has no folders, renames or appends: an object appears whole when its upload ends, or not at all.
Writers that rename a temporary file or folder into place on disk upload straight to the name there instead.
"""

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://bucket/...) rather than a local path."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path, made absolute if local (epath would put the working directory before a URL)."""
    path = epath.Path(path)
    return path if is_remote(path) else path.absolute()


def files_under(folder: epath.Path) -> list[epath.Path]:
    """Every file in `folder` and its subfolders, in path order (none if it is missing; epath refuses `**`
    globs, costly on buckets)."""
    walked = list(folder.walk())
    if not walked:
        return []
    listed = walked[0][0]  # `folder` as its file system names it: gcsfs drops the gs:// scheme, so rebase on `folder`
    return sorted(folder / top.relative_to(listed) / name for top, _, names in walked for name in names)
