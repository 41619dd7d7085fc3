"""One interface per family: callers ask a transformer, text encoder or autoencoder what they need (`models.family`)
and never branch on its concrete class, so a new family is new modules plus one registration."""

import ast
import json
from pathlib import Path

import pytest

from lumina_jax.models.family import Autoencoder, AutoencoderConfig, TextEncoderConfig, TransformerConfig
from lumina_jax.models.flagdit import FlagDiTConfig
from lumina_jax.models.lumina2 import UnifiedNextDiTConfig
from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.models.vae import FLUX_VAE, SDXL_VAE
from lumina_jax.weights.nextdit import ARCHITECTURES, config_from_dict
from lumina_jax.weights.text_encoder import TEXT_ENCODERS, text_encoder_family, text_encoder_model
from lumina_jax.weights.vae import AUTOENCODERS, autoencoder_family, autoencoder_model

LIBRARY = Path(__file__).resolve().parent.parent / "lumina_jax"
FAMILY_CLASSES = {
    "NextDiT",
    "NextDiTConfig",
    "FlagDiT",
    "FlagDiTConfig",
    "UnifiedNextDiT",
    "UnifiedNextDiTConfig",
    "GemmaEncoder",
    "GemmaConfig",
    "Gemma2Encoder",
    "Gemma2Config",
    "LlamaEncoder",
    "LlamaConfig",
    "AutoencoderKL",
    "AutoencoderKLConfig",
}
# Only the families' own modules (models and key maps) may ask for their classes; the registries
# (weights.nextdit.ARCHITECTURES, weights.text_encoder.TEXT_ENCODERS, weights.vae.AUTOENCODERS) look a
# config's class up instead.
OWN_MODULES = {
    "models/nextdit.py",
    "models/flagdit.py",
    "models/lumina2.py",
    "models/gemma.py",
    "models/gemma2.py",
    "models/llama.py",
    "weights/nextdit_keys.py",
    "weights/flagdit_keys.py",
    "weights/lumina2_keys.py",
    "weights/gemma.py",
    "weights/gemma2.py",
    "weights/llama.py",
    "models/vae.py",
    "weights/vae.py",
}


def _class_names(node: ast.expr) -> set[str]:
    """The class names an isinstance target or an `is` operand names: `A`, `module.A`, `(A, B)`."""
    if isinstance(node, ast.Tuple):
        return set().union(*map(_class_names, node.elts))
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    return set()


def family_branches(source: str) -> list[tuple[int, str]]:
    """Lines where the code asks for a concrete family: isinstance(x, Family) or `x is Family`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            named = _class_names(node.args[1]) if len(node.args) == 2 else set()
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            named = set().union(*map(_class_names, [node.left, *node.comparators]))
        else:
            continue
        found += [(node.lineno, name) for name in sorted(named & FAMILY_CLASSES)]
    return found


def test_no_caller_branches_on_a_concrete_family():
    branches = [
        f"{path.relative_to(LIBRARY)}:{line}: {name}"
        for path in sorted(LIBRARY.rglob("*.py"))
        if path.relative_to(LIBRARY).as_posix() not in OWN_MODULES
        for line, name in family_branches(path.read_text())
    ]
    assert not branches, "callers branch on a concrete family; ask its config or model instead:\n" + "\n".join(branches)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("isinstance(model, FlagDiT)", 1),
        ("isinstance(config, (NextDiTConfig, flagdit.FlagDiTConfig))", 2),
        ("family is FlagDiTConfig", 1),
        ("type(encoder) is not LlamaEncoder", 1),
        ("isinstance(x, dict) or x is None", 0),
    ],
)
def test_the_check_sees_every_form_of_a_family_branch(source, expected):
    assert len(family_branches(source)) == expected


# A small config of each transformer family: 2 heads of 32, 32 caption features.
SMALL_CONFIGS = {
    NextDiTConfig: dict(cross_attention_dim=32),
    FlagDiTConfig: dict(cross_attention_dim=32),
    UnifiedNextDiTConfig: dict(cap_feat_dim=32, num_kv_heads=1, axes_dim_rope=(8, 12, 12)),
}


@pytest.mark.parametrize("config_class", list(SMALL_CONFIGS))
def test_every_registered_transformer_answers_the_family_interface(config_class):
    assert config_class in ARCHITECTURES
    config = config_class(hidden_size=64, num_layers=1, num_attention_heads=2, **SMALL_CONFIGS[config_class])
    assert isinstance(config, TransformerConfig)
    model_class = ARCHITECTURES[config_class].model
    methods = ("__call__", "forward_sequence", "image_rope", "caption_keys_values")  # `Transformer`'s
    assert all(callable(getattr(model_class, name, None)) for name in methods)
    assert config_from_dict(config.to_dict()) == config  # its config.json names it: registered once, found by name


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_every_registered_text_encoder_answers_the_family_interface(name):
    family = TEXT_ENCODERS[name]
    config = family.config()
    assert isinstance(config, TextEncoderConfig)
    assert text_encoder_model(config) is family.model


@pytest.mark.parametrize("config", [SDXL_VAE, FLUX_VAE], ids=["sdxl", "flux"])
def test_every_registered_autoencoder_answers_the_family_interface(config):
    family = AUTOENCODERS[config.to_dict()["_class_name"]]
    assert isinstance(config, AutoencoderConfig)
    assert autoencoder_model(config) is family.model
    assert all(callable(getattr(family.model, name, None)) for name in ("encode", "decode"))  # `Autoencoder`'s
    assert {"config", "dtype"} <= set(Autoencoder.__annotations__)


@pytest.mark.parametrize(
    "find, config, message",
    [
        (
            autoencoder_family,
            {"_class_name": "AutoencoderDC"},
            "autoencoder _class_name 'AutoencoderDC' is not supported",
        ),
        (text_encoder_family, {"model_type": "t5"}, "text encoder model_type 't5' is not supported"),
        (autoencoder_family, ["a list"], "not a supported autoencoder config"),
    ],
)
def test_an_unregistered_family_is_refused_naming_its_config(tmp_path, find, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{tmp_path}/config.json: {message}"):
        find(tmp_path)


# Each family's model module; the parts families share live in modules named for what they are.
FAMILY_MODELS = {
    "lumina_jax.models.nextdit",
    "lumina_jax.models.flagdit",
    "lumina_jax.models.lumina2",
    "lumina_jax.models.gemma",
    "lumina_jax.models.gemma2",
    "lumina_jax.models.llama",
}


def imported_modules(source: str) -> set[str]:
    """The modules `import m` and `from m import n` name, and m.n (a submodule, maybe) for `from m import n`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("module", sorted(FAMILY_MODELS))
def test_no_family_borrows_from_another(module):
    path = LIBRARY.parent / (module.replace(".", "/") + ".py")
    borrowed = imported_modules(path.read_text()) & (FAMILY_MODELS - {module})
    assert not borrowed, f"{module} imports {sorted(borrowed)}: move the shared parts to a module of their own"
