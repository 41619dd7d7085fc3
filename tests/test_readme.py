"""The README's code runs as written: "Using the transformer" loads a checkpoint and calls the model
through one compiled program, not op by op."""

import re
from pathlib import Path

import jax
import numpy as np

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
    compiled = []
    listener = lambda event, seconds, **_: event == "/jax/core/compile/backend_compile_duration" and compiled.append(1)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        exec(code, names)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert names["velocity"].shape == (io["a_x"].shape[0], 8, *io["a_x"].shape[2:])
    # op by op, the same call compiles a program per primitive outside the layer scan: 68 here
    assert len(compiled) <= 3, f"{len(compiled)} programs compiled"
