"""PyTorch references for the parity tests: diffusers modules with every parameter randomised."""

import contextlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    LuminaNextDiT2DModel,
    LuminaPipeline,
)
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2Model,
    GemmaConfig,
    GemmaModel,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
    PreTrainedTokenizerFast,
)

FIXTURES = Path(__file__).parent / "fixtures"


class ShapeOnly:
    """A tensor known only by its shape, as a checkpoint's index gives it."""

    def __init__(self, shape):
        self.shape, self.dtype = tuple(shape), np.dtype(np.float32)

    def load(self):
        raise AssertionError("planning must not read tensor data")


def released(name: str) -> dict[str, ShapeOnly]:
    """The key and shape list of a released checkpoint (tests/fixtures/keys_*.json)."""
    return {k: ShapeOnly(v) for k, v in json.loads((FIXTURES / name).read_text()).items()}


@contextlib.contextmanager
def compilations():
    """A list that collects the name of each program XLA compiles while the block runs ("train_step")."""
    compiled = []

    def count(event, duration, fun_name=None, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(count)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2^2), gates,
    pad tokens and biases ~ N(0, 0.5^2) or so, so no zero-initialised path goes untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:
                value = noise * param.shape[1] ** -0.5
            elif "norm" in name and name.endswith("weight"):
                value = 1 + 0.2 * noise
            elif name.endswith("gate") or name == "pad_token":
                value = noise
            else:
                value = 0.3 * noise
            param.copy_(value.to(param.dtype))
    return module


def random_transformer(seed: int = 0, **config) -> LuminaNextDiT2DModel:
    """A randomised transformer whose two copies of the shared query (attn1/attn2 to_q and norm_q)
    are equal, as in the released weights, where the original model has a single query."""
    model = randomize_(LuminaNextDiT2DModel(**config).eval(), seed)
    with torch.no_grad():
        for block in model.layers:
            block.attn2.to_q.load_state_dict(block.attn1.to_q.state_dict())
            block.attn2.norm_q.load_state_dict(block.attn1.norm_q.state_dict())
    return model


def transformer_forward(model, x, t, caption, mask, *, linear_factor=1.0, ntk_factor=1.0, base_sequence_length=None):
    """diffusers' transformer as its pipeline calls it, numpy in and out (float32)."""
    rope = get_2d_rotary_pos_embed_lumina(model.head_dim, 384, 384, linear_factor=linear_factor, ntk_factor=ntk_factor)
    kwargs = {} if base_sequence_length is None else {"base_sequence_length": base_sequence_length}
    with torch.no_grad():
        out = model(
            torch.from_numpy(np.asarray(x, np.float32)),
            torch.from_numpy(np.asarray(t, np.float32)),
            torch.from_numpy(np.asarray(caption, np.float32)),
            torch.from_numpy(np.asarray(mask)),
            image_rotary_emb=rope,
            cross_attention_kwargs=kwargs,
            return_dict=False,
        )[0]
    return out.float().numpy()


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def inputs(seed: int, batch: int, height: int, width: int, caption_len: int, caption_dim: int, valid: list[int]):
    """Latents, timesteps in (0, 1), caption features and a right-padded caption mask."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, height, width), dtype=np.float32)
    t = rng.uniform(0.05, 0.95, batch).astype(np.float32)
    caption = rng.standard_normal((batch, caption_len, caption_dim), dtype=np.float32)
    mask = (np.arange(caption_len)[None] < np.asarray(valid)[:, None]).astype(np.int64)
    return x, t, caption, mask


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on the spot (no model hub); like Gemma's it pads on the right and
    starts every text with <bos>, so the empty negative prompt still has one token to attend to."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [text.lower() for text in corpus]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<bos>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>")


def random_vae(seed: int, **config) -> AutoencoderKL:
    """A small SDXL-like VAE (4 latent channels, 8x down, scaling factor 0.13025; `config` overrides), randomised."""
    vae = AutoencoderKL(
        **dict(
            block_out_channels=[16, 32, 32, 32],
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4,
            scaling_factor=0.13025,
        )
        | config
    )
    return randomize_(vae.eval(), seed=seed)


def build_llama_tokenizer(corpus: list[str]) -> LlamaTokenizer:
    """A LLaMA tokenizer (byte-fallback BPE over "▁"-joined text, as Llama-2's) trained on the spot."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"], vocab_size=80))
    return LlamaTokenizer(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def random_t2i_pipeline(folder: Path, corpus: list[str], *, scheduler_shift: float | None = 4.0) -> tuple:
    """A Lumina-T2I pipeline folder of tiny random parts in their released layouts: the original code's
    Flag-DiT checkpoint (fixtures/lumina_t2i_original_tiny/qk, 40 caption features), a transformers
    LlamaModel with its tokenizer, a diffusers VAE, and a scheduler config holding the time shift.
    Returns the torch text encoder, tokenizer and VAE."""
    transformer = folder / "transformer"
    transformer.mkdir(parents=True)
    for name in ("consolidated.00-of-01.pth", "model_args.pth"):
        shutil.copy(FIXTURES / "lumina_t2i_original_tiny" / "qk" / name, transformer / name)
    tokenizer = build_llama_tokenizer(corpus)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=40,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    text_encoder = randomize_(LlamaModel(llama).eval(), seed=21)
    vae = random_vae(seed=22)
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    vae.save_pretrained(folder / "vae")
    if scheduler_shift is not None:
        FlowMatchEulerDiscreteScheduler(shift=scheduler_shift).save_pretrained(folder / "scheduler")
    index = {"_class_name": "LuminaT2IPipeline", "transformer": ["lumina_jax", "FlagDiT"]}
    index |= {"text_encoder": ["transformers", "LlamaModel"], "tokenizer": ["transformers", "LlamaTokenizer"]}
    index |= {"vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return text_encoder, tokenizer, vae


# The tiny Next-DiT of most tests and checks: 4 query heads sharing 2 kv heads of 16, two layers.
TINY_NEXT_DIT = dict(
    hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, multiple_of=16, cross_attention_dim=32
)


def random_pipeline(folder: Path, corpus: list[str], caption_dim: int = 32) -> LuminaPipeline:
    """A diffusers LuminaPipeline of tiny random components, saved to `folder` in the released layout."""
    transformer = random_transformer(seed=11, sample_size=16, **(TINY_NEXT_DIT | dict(cross_attention_dim=caption_dim)))
    with torch.no_grad():  # keep the random velocity field tame so a few Euler steps stay well conditioned
        transformer.norm_out.linear_2.weight.mul_(0.1)
    gemma = GemmaConfig(
        vocab_size=64,
        hidden_size=caption_dim,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    text_encoder = randomize_(GemmaModel(gemma).eval(), seed=12)
    vae = random_vae(seed=13)
    pipeline = LuminaPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(corpus),
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(folder)
    return pipeline


def random_lumina2_pipeline(folder: Path, corpus: list[str]) -> Lumina2Pipeline:
    """A diffusers Lumina2Pipeline of tiny random components of the released kinds (Lumina2Transformer2DModel,
    a transformers Gemma2Model with a tokenizer, a 16-channel AutoencoderKL without quant convs and with the
    FLUX VAE's scale and shift, FlowMatchEulerDiscreteScheduler with a shift), saved to `folder`."""
    tokenizer = build_tokenizer(corpus)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=40,
            intermediate_size=72,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            query_pre_attn_scalar=16,
            sliding_window=8,
            attn_logit_softcapping=5.0,
        )
    )
    transformer = Lumina2Transformer2DModel(
        sample_size=16,
        in_channels=16,
        hidden_size=64,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=4,
        num_kv_heads=2,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        cap_feat_dim=40,
    )
    randomize_(transformer.eval(), seed=21)
    with torch.no_grad():  # keep the random velocity field tame so a few Euler steps stay well conditioned
        transformer.norm_out.linear_2.weight.mul_(0.1)
    pipeline = Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=random_vae(
            23,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ),
        text_encoder=randomize_(text_encoder.eval(), seed=22),
        tokenizer=tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(folder)
    return pipeline


def digits_pipeline_with_vae(folder: Path, text_hidden: int) -> Path:
    """The digits base pipeline (`digits.write_base_pipeline`) with a VAE of two blocks: 32 px images of
    16x16 latents."""
    from lumina_jax.training import digits

    pipeline = digits.write_base_pipeline(folder, text_hidden=text_hidden)
    AutoencoderKL(
        block_out_channels=[8, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8,
        latent_channels=4,
        scaling_factor=0.5,
    ).save_pretrained(pipeline / "vae")
    index = json.loads((pipeline / "model_index.json").read_text())
    (pipeline / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    return pipeline


def randomize_lora_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every LoRA parameter PEFT injected, random (PEFT starts B at zero, an adapter that changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model
