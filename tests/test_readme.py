"""The README's code runs as written: "Using the transformer" loads a checkpoint and calls the model
through one compiled program, not op by op; the Lumina-T2I section loads, encodes and samples."""

import re
from pathlib import Path

import numpy as np
from reference import compilations, randomize_

README = Path(__file__).resolve().parents[1] / "README.md"
ORIGINAL = Path(__file__).parent / "fixtures" / "lumina_next_original_tiny"


def python_block(section: str) -> str:
    text = README.read_text()
    body = text[text.index(f"## {section}\n") :]
    return re.search(r"```python\n(.*?)```", body, re.S)[1]


def test_using_the_transformer_compiles_one_program():
    code = python_block("Using the transformer")
    assert '"checkpoints/lumina-next-sft"' in code
    code = code.replace('"checkpoints/lumina-next-sft"', repr(str(ORIGINAL))).replace('"bfloat16"', '"float32"')
    io = np.load(ORIGINAL / "io.npz")
    names = dict(
        hidden_states=io["a_x"], timestep=io["a_t"], encoder_hidden_states=io["a_cap"], encoder_mask=io["a_cap_mask"]
    )
    with compilations() as compiled:
        exec(code, names)
    assert names["velocity"].shape == (io["a_x"].shape[0], 8, *io["a_x"].shape[2:])
    # op by op, the same call compiles a program per primitive outside the layer scan: 68 here
    assert len(compiled) <= 3, f"{len(compiled)} programs compiled"


def test_lumina_t2i_runs_as_written(tmp_path):
    """The Lumina-T2I snippet, with the tiny original checkpoint and a tiny random LLaMA in place of the 5B and 7B."""
    import transformers

    code = python_block("Lumina-T2I (Flag-DiT 5B with LLaMA-2-7B): the model, its text encoder and its sampler")
    llama = transformers.LlamaModel(
        transformers.LlamaConfig(
            vocab_size=64, hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
    )
    randomize_(llama.eval(), 0).save_pretrained(tmp_path / "llama")
    tiny_t2i = Path(__file__).parent / "fixtures" / "lumina_t2i_original_tiny" / "qk"  # captions 40 wide
    code = code.replace('"Lumina-T2I"', repr(str(tiny_t2i))).replace('"Llama-2-7b-hf"', repr(str(tmp_path / "llama")))
    code = code.replace("shifted_schedule(29,", "shifted_schedule(3,")
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])  # a prompt, then its negative
    names = dict(
        input_ids=np.array([[1, 5, 2, 0], [1, 2, 0, 0]]),
        attention_mask=mask,
        noise=np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32),
    )
    exec(code, names)
    assert type(names["model"]).__name__ == "FlagDiT"
    assert names["latents"].shape == (1, 4, 8, 8) and np.isfinite(np.asarray(names["latents"])).all()
