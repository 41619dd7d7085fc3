"""Finding, checking and importing Lumina-T2I's LLaMA text encoder's weights.

Layouts as Gemma's: a transformers folder (config.json with model.safetensors, or shards listed by
model.safetensors.index.json), a pipeline folder (its text_encoder/), or a folder written by
`convert_llama`. Keys are LlamaModel's, or LlamaForCausalLM's under `model.` (meta-llama/Llama-2-7b-hf
is one); the causal LM's `lm_head.weight` is left out, as transformers' AutoModel leaves it.
"""

import dataclasses
import functools
from pathlib import Path

from lumina_jax.models.llama import LlamaConfig, LlamaEncoder
from lumina_jax.weights.family import ModelFamily
from lumina_jax.weights.gemma import decoder_key_to_target
from lumina_jax.weights.importer import Checkpoint

_LM_HEAD = "lm_head.weight"

llama_key_to_target = functools.partial(decoder_key_to_target, norm_scale="scale")


class LlamaFamily(ModelFamily):
    def find(self, path: str | Path, *, revision: str | None = None) -> Checkpoint:
        checkpoint = super().find(path, revision=revision)
        if checkpoint.tensors is None or _LM_HEAD not in checkpoint.tensors:
            return checkpoint
        return dataclasses.replace(checkpoint, tensors={k: v for k, v in checkpoint.tensors.items() if k != _LM_HEAD})


LLAMA = LlamaFamily(
    name="LLaMA",
    model=LlamaEncoder,
    config=LlamaConfig,
    key_to_target=llama_key_to_target,
    subfolder="text_encoder",
    stem="model",
    hub_kind="text_encoder",
)
load_llama = LLAMA.load  # (path, dtype, *, param_dtype=, scan_layers=, mesh=, revision=)
convert_llama = LLAMA.convert
