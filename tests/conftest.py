"""Fixtures shared by several test files."""

import gc

import huggingface_hub._snapshot_download as snapshot_module
import pytest
from huggingface_hub import constants


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: the code under test finds only what a test puts there."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import (and before 1.0 copied the cache's place
    # into _snapshot_download)
    for module in (constants, snapshot_module):
        if hasattr(module, "HF_HUB_CACHE"):
            monkeypatch.setattr(module, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(autouse=True, scope="session")
def compilation_cache(tmp_path_factory):
    """The commands' persistent compilation cache (`cli.use_compilation_cache`) in a folder of the session, so
    the commands tests start as subprocesses never write the user's ~/.cache. Commands called in-process
    leave it off: JAX's cache is process-wide, so it would then store every later test's programs too, and
    its writes have crashed the suite there (a segfault in compilation_cache.put_executable_and_time)."""
    # Imported here, after collection: test modules set XLA_FLAGS and TPU variables before JAX loads.
    from lumina_jax.cli import sample, train

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LUMINA_JAX_CACHE", str(tmp_path_factory.mktemp("lumina-jax-cache")))
        for command in (sample, train):
            patch.setattr(command, "use_compilation_cache", lambda: None)
        yield


@pytest.fixture(autouse=True, scope="module")
def free_compiled_programs():
    """Each test file's compiled programs are freed after it: one process runs many files, and would otherwise
    hold every file's programs to the end."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
