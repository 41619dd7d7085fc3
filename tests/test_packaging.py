"""The wheel as users install it: one top-level package, the shipped configs and digits model inside it,
and the console scripts working from a folder outside the repository in a fresh virtual environment."""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a fresh clone has and a wheel build may not see: git's files, the repository's venv, earlier builds.
NOT_SOURCE = {".git", ".venv", "build", "dist", "out", "__pycache__", ".pytest_cache"}


def run(command: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict, Path]:
    """The wheel built from a copy of the repository, installed into a new venv: (wheel, venv, its environment
    variables, an empty folder outside the repository)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"  # a copy, so that the build writes nothing into the repository
    shutil.copytree(
        ROOT, source, ignore=lambda _, names: [n for n in names if n in NOT_SOURCE or n.endswith(".egg-info")]
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"JAX_PLATFORMS": "cpu", "LUMINA_JAX_CACHE": str(tmp / "cache"), "PIP_NO_INDEX": "1"}
    wheels = tmp / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source],
        tmp,
        env,
    )
    (wheel,) = wheels.glob("*.whl")

    # The dependencies are this interpreter's: a plain path in a .pth file puts its site-packages after the new
    # venv's own (`--system-site-packages` would reach the base interpreter's, not this venv's). Only the new
    # venv's folder is a site folder, so no .pth of this environment runs (an editable install's finder among them).
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    python = venv / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, env).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()))
    # --ignore-installed: pip sees this environment's lumina-jax and must leave it alone.
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--no-compile", wheel], tmp, env)
    work = tmp / "work"  # outside the repository: nothing there to import
    work.mkdir()
    return wheel, venv, env, work


def test_the_wheel_installs_one_top_level_package(installed):
    wheel, venv, env, work = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"lumina_jax"}
    (top_level,) = [name for name in names if name.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["lumina_jax"]
    code = "from lumina_jax import assets; from lumina_jax.training import config\n"
    code += "print(assets.__file__, assets.DIGITS_MODEL, config.CONFIG_FOLDER)"
    paths = [Path(p) for p in run([venv / "bin" / "python", "-c", code], work, env).stdout.split()]
    assert all(path.is_relative_to(venv) for path in paths), paths  # the installed lumina_jax, not the repository's
    _, model, configs = paths
    assert (model / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in configs.glob("*.py")) == sorted(
        p.name for p in (ROOT / "lumina_jax" / "configs").glob("*.py")
    )


def test_the_console_scripts_run_outside_the_repository(installed):
    _, venv, env, work = installed
    for command in ("lumina-sample", "lumina-convert", "lumina-train"):
        script = venv / "bin" / command
        assert script.is_file(), command
        usage = run([script, "--help"], work, env).stdout
        assert usage.startswith(f"usage: {command} "), usage
    assert "lumina-train export --config" in usage  # the last, lumina-train's: its subcommands as it is called
    # the shipped configs, listed from inside the installed package
    train = subprocess.run(
        [venv / "bin" / "lumina-train", "--config", "nothing"], cwd=work, env=env, capture_output=True, text=True
    )
    assert (
        train.returncode == 2
        and "'digits_lora', 'lumina_image_2', 'lumina_next_sft', 'lumina_next_sft_lora', 'lumina_t2i'" in train.stderr
    ), train.stderr

    # the shipped digits model is the default
    arguments = ["--prompt", "a handwritten digit three", "--steps", "2", "--out", "out"]
    run([venv / "bin" / "lumina-sample", *arguments], work, env)
    assert [p.suffix for p in (work / "out").iterdir() if p.name != "index.jsonl"] == [".png"]
