"""Text to image: Gemma features -> Next-DiT flow ODE -> SDXL VAE, with diffusers' LuminaPipeline API;
Lumina-T2I's LLaMA features -> Flag-DiT flow ODE -> SDXL VAE, and Lumina-Image 2.0's Gemma-2 features ->
Unified Next-DiT flow ODE -> FLUX VAE, with the same API.

The components' configs tell the families apart. Each family samples as its reference does unless told
otherwise: Lumina-Next as diffusers' LuminaPipeline (its flow-match schedule, lower-cased captions, RoPE
scaled linearly until t = 1), Lumina-T2I as its demo (the time-shifted uniform grid, shift 4 unless the
scheduler config says otherwise, captions as typed between <s> and </s>, NTK-scaled RoPE at every step),
Lumina-Image 2.0 as diffusers' Lumina2Pipeline (captions after its system prompt, negative prompts
without it; sigmas linspace(1, 1/N, N) through the scheduler config's shift; guidance on every channel,
renormalised by default, `cfg_normalization`, and truncated by `cfg_trunc_ratio`).

A pipeline without a VAE (model_index.json says `"vae": null`) works in pixel space: the
transformer's latents [B, 3, H, W] (or [B, 1, H, W], grey) in [-1, 1] are the image (the small
digits model is such a one).

Arguments shared with diffusers' `LuminaPipeline.__call__` mean the same; `latents` and
`output_type="latent"` use its [B, 4, H/8, W/8] layout, so the same noise gives the same image.
Unlike diffusers, prompt masks stay aligned with their embeddings when num_images_per_prompt > 1,
and an image never depends on the other prompts of its call: `seed` may give one seed per image, and
each negative prompt is cut to its own prompt's length (diffusers cuts all to the longest).
Captions are padded to a few length buckets (padding is masked, so results do not change) and
guidance scale, seed and prompt are traced values: a new prompt or seed reuses the compiled programs.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from lumina_jax import hub, regions, sampling
from lumina_jax.models import flagdit, lumina2
from lumina_jax.models.family import Autoencoder, AutoencoderConfig, TextEncoderConfig, Transformer, TransformerConfig
from lumina_jax.models.gemma import GEMMA_2B
from lumina_jax.models.gemma2 import GEMMA_2_2B
from lumina_jax.models.llama import LLAMA_2_7B
from lumina_jax.models.nextdit import PRESETS
from lumina_jax.models.vae import FLUX_VAE, SDXL_VAE
from lumina_jax.sharding import rows_sharding, shard_module
from lumina_jax.weights.importer import has_vae, read_config, resolve_dtype
from lumina_jax.weights.lora import AttachedLora, attach_lora, merge_lora
from lumina_jax.weights.nextdit import MODELS, TRANSFORMER, config_from_dict, load_transformer
from lumina_jax.weights.text_encoder import text_encoder_family, text_encoder_model
from lumina_jax.weights.vae import autoencoder_family, autoencoder_model

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 256  # tokens; diffusers ignores its own max_sequence_length argument (Lumina-T2I trained on 128)
CAPTION_BUCKETS = (32, 64, 128, 256)
COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer")
# The released pipelines' architectures (transformer, text encoder, VAE), for planning without their
# files (`LuminaPipeline.abstract`); found by name, hub id or download folder (`released_architecture`).
RELEASED = {
    "lumina-next-sft": (PRESETS["NextDiT_2B_GQA_patch2"], GEMMA_2B, SDXL_VAE),
    "lumina-next-t2i": (PRESETS["NextDiT_2B_GQA_patch2"], GEMMA_2B, SDXL_VAE),
    "lumina-t2i": (flagdit.PRESETS["DiT_Llama_5B_patch2"], LLAMA_2_7B, SDXL_VAE),
    "lumina-image-2.0": (lumina2.PRESETS["NextDiT_2B_GQA_patch2_Adaln_Refiner"], GEMMA_2_2B, FLUX_VAE),
}


def released_architecture(
    name: str | Path,
) -> tuple[TransformerConfig, TextEncoderConfig, AutoencoderConfig] | None:
    """The architecture of a released pipeline named "lumina-next-sft", "Alpha-VLLM/Lumina-Next-SFT-diffusers",
    "lumina-t2i", "Alpha-VLLM/Lumina-Image-2.0" or by a download folder of such a name that is not there;
    None for any other name."""
    if Path(name).exists():
        return None
    return RELEASED.get(Path(name).name.lower().removesuffix("-diffusers"))


@dataclasses.dataclass
class LuminaPipelineOutput:
    images: list[Image.Image] | np.ndarray  # PIL images, [B, H, W, 3] floats in [0, 1], or latents


class Conditioning(NamedTuple):
    """The sampler's caption rows (`sampling.sample`): each image's, then (guided) each image's negative."""

    caption: jax.Array  # [rows, L, D] features
    caption_mask: jax.Array  # [rows, L]
    caption_regions: jax.Array | None = None  # [rows, tokens, L]: compositional generation's (`regions`)

    def images(self, guided: bool) -> int:
        return self.caption.shape[0] // (2 if guided else 1)


def caption_bucket(length: int) -> int:
    """The length captions are padded to when the longest has `length` tokens (sampling and training alike)."""
    if length > CAPTION_BUCKETS[-1]:
        raise ValueError(f"captions have at most {CAPTION_BUCKETS[-1]} tokens here, got {length}")
    return next(b for b in CAPTION_BUCKETS if b >= length)


# jax.jit over split modules: nnx.jit would walk the module graph on every call.
@functools.partial(jax.jit, static_argnums=0)
def _encode_text(graphdef, params, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(input_ids, attention_mask)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, params, latents: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params).decode(latents)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _noise(seed: jax.Array, shape: tuple[int, ...], stream: int = 0) -> jax.Array:
    """Normal noise of a seed: stream 0 the sampler's start, stream 1 the image-to-image posterior sample."""
    key = jax.random.key(seed)
    return jax.random.normal(key if stream == 0 else jax.random.fold_in(key, stream), shape, jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _noise_per_image(seeds: jax.Array, shape: tuple[int, ...], stream: int = 0) -> jax.Array:
    """Image i's noise from seeds[i] alone: what `_noise(seeds[i], (1, *shape))` draws for one image."""
    return jax.vmap(lambda seed: _noise(seed, (1, *shape), stream)[0])(seeds)


@functools.partial(jax.jit, static_argnums=0)
def _encode_image(graphdef, params, images: jax.Array, noise: jax.Array) -> jax.Array:
    """Images [B, 3, H, W] in [-1, 1] -> scaled latents of a sample of the VAE's posterior, as the original
    img2img draws them (`latent_dist.sample()`), with `noise` [B, C, h, w]."""
    vae = nnx.merge(graphdef, params)
    mean, logvar = vae.encode(images)
    return vae.config.scale_latents(mean + jnp.exp(0.5 * logvar) * noise)


def load_image(image, height: int, width: int) -> np.ndarray:
    """A PIL image, or an array [H, W, 3] (uint8, or floats in [0, 1]), as the original img2img reads it:
    resized to width x height (PIL's resize), then RGB, [3, H, W] in [-1, 1]."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"image: expected a PIL image or an array [height, width, 3], got shape {array.shape}")
        if array.dtype != np.uint8:
            if not (np.isfinite(array).all() and 0.0 <= array.min() and array.max() <= 1.0):
                raise ValueError("image: a float array must hold values in [0, 1]")
            array = (array * 255).round().astype(np.uint8)
        image = Image.fromarray(array)
    pixels = np.asarray(image.resize((width, height)).convert("RGB"), np.float32) / np.float32(255)
    return ((pixels - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)  # ToTensor, Normalize(0.5, 0.5)


def _read_images(image):
    """File names (str or path), one or a list, as the PIL images they hold, as diffusers users pass them;
    anything else as it is (a tuple as a list)."""
    if isinstance(image, (list, tuple)):
        return [_read_images(i) for i in image]
    if not isinstance(image, (str, os.PathLike)):
        return image
    try:
        picture = Image.open(image)
        picture.load()
    except OSError as e:
        raise ValueError(f"image {str(image)!r}: not a picture PIL can read ({e.strerror or e})") from None
    return picture


def _check_texts(name: str, texts) -> None:
    """TypeError unless `texts` is None, a string or a list of strings; ValueError for a string that UTF-8
    cannot encode (the surrogates standing for undecodable bytes), which the tokenizer would refuse."""
    if texts is None:
        return
    items = [texts] if isinstance(texts, str) else texts
    if not isinstance(items, (list, tuple)) or not all(isinstance(text, str) for text in items):
        raise TypeError(f"{name} must be a string or a list of strings, got {texts!r:.80}")
    for text in items:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name} {text!r:.80} is not UTF-8 text ({e.reason} at character {e.start})") from None


def _checked_seed(seed) -> int | list[int]:
    """`seed` as __call__ takes it, one integer or one per image, in the range of JAX's uint32 keys."""
    seeds, top = np.asarray(seed), np.iinfo(np.uint32).max
    integers = np.issubdtype(seeds.dtype, np.integer) and seeds.ndim <= 1 and seeds.size
    if not (integers and 0 <= seeds.min() and seeds.max() <= top):
        raise ValueError(f"seed must be an integer from 0 to {top}, or a list of one per image, got {seed!r:.80}")
    return int(seeds) if seeds.ndim == 0 else seeds.tolist()


def _sampler_options(options: sampling.SamplerOptions | None, fields: dict) -> sampling.SamplerOptions:
    """`options` (default: `SamplerOptions()`) with the fields given by name replaced."""
    return dataclasses.replace(options or sampling.SamplerOptions(), **fields)


# FlowMatchEulerDiscreteScheduler options that change its sigmas in ways the sampler does not reproduce
SCHEDULER_OPTIONS_NOT_TAKEN = (
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def _scheduler_shift(pipeline: Path) -> float | None:
    """The flow schedule's shift from a pipeline folder's scheduler config (None without one: the schedule's
    own default). With use_dynamic_shifting, exp(mu) (its exponential time shift is the shift's formula at
    that shift), mu as diffusers' Lumina2Pipeline computes it: for an "image_seq_len" of the latents'
    shape[1], the transformer's in_channels, whatever the image size (diffusers' quirk, kept)."""
    scheduler = pipeline / "scheduler" / "scheduler_config.json"
    if not scheduler.exists():
        return None
    config = json.loads(scheduler.read_text())
    for key in SCHEDULER_OPTIONS_NOT_TAKEN:
        if config.get(key):
            raise ValueError(f"{scheduler}: {key}={config[key]!r} is not supported; remove it or set it to null/false")
    if not config.get("use_dynamic_shifting"):
        return config.get("shift", 1.0)
    if config.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(f"{scheduler}: time_shift_type {config['time_shift_type']!r}; only 'exponential' is supported")
    channels = json.loads((pipeline / "transformer" / "config.json").read_text())["in_channels"]
    base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (top - base)
    return math.exp(channels * slope + base_shift - slope * base)


def _in_memory(tree, kind: str):
    """Arrays (or ShapeDtypeStructs, for lowering) moved to a memory kind of their devices ("device",
    "pinned_host")."""

    def move(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding.with_memory_kind(kind))
        return jax.device_put(leaf, leaf.sharding.with_memory_kind(kind))

    return jax.tree.map(move, tree)


class LuminaPipeline:
    def __init__(
        self,
        transformer: Transformer | None,
        text_encoder: nnx.Module,  # its config a `TextEncoderConfig`
        vae: Autoencoder | None,
        tokenizer,
        *,
        scheduler_shift: float | None = None,
    ):
        """vae None: pixel space. transformer None: only the encoders (e.g. to build a training cache)."""
        self.transformer, self.text_encoder, self.vae, self.tokenizer = transformer, text_encoder, vae, tokenizer
        self._text_encoder_split = nnx.split(text_encoder)
        self._vae_split = None if vae is None else nnx.split(vae)
        self.scheduler_shift = scheduler_shift
        self.mesh: Mesh | None = None
        self.lora_adapters: dict[str, AttachedLora] = {}  # unmerged, by name (`load_lora_weights(merge=False)`)
        self.weightless = False  # set by `abstract`: shapes only, programs can be lowered but not run
        self.text_encoder_offloaded = False  # `offload_text_encoder`
        self.latent_scale = 1 if vae is None else vae.config.downsample_factor  # image pixels per latent pixel
        self.default_sample_size = transformer and transformer.config.sample_size * self.latent_scale

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str = "bfloat16",
        *,
        transformer: Transformer | None | str = "load",
        vae_dtype: str | None = None,
        mesh: Mesh | None = None,
        progress: bool = True,
        revision: str | None = None,
    ) -> "LuminaPipeline":
        """A diffusers pipeline folder as downloaded, or one written by `python -m convert` (fast load), or
        a Hugging Face hub id ("Alpha-VLLM/Lumina-Next-SFT-diffusers"; its files at `revision`, cached).
        A Lumina-T2I pipeline folder has the same components: transformer/ (Flag-DiT, in the original
        layout or converted), text_encoder/ (LLaMA), tokenizer/, vae/ and scheduler/ (its time shift);
        `python -m convert` assembles one from the released parts.

        The VAE runs in vae_dtype; by default float32 when its config asks for it (force_upcast, as
        the SDXL VAE does), else in `dtype`. vae_dtype="bfloat16" halves the decoder's memory (at
        1024 px its float32 activations reach several GB), as diffusers' LuminaPipeline decodes.
        As in diffusers, `transformer=` a model uses that one, and `transformer=None` loads none.
        On a `mesh` (default: JAX's current one, if set) each weight loads straight into its sharding
        and the pipeline runs there (`shard`).
        """
        mesh = jax.sharding.get_mesh() if mesh is None else mesh
        mesh = None if mesh.empty else mesh
        components = hub.PIPELINE_COMPONENTS if transformer == "load" else ("text_encoder", "vae")
        path = hub.local_path(path, "pipeline", revision=revision, components=components)
        expected = [
            c for c in COMPONENTS if (c != "vae" or has_vae(path)) and (c != "transformer" or transformer == "load")
        ]
        missing = [name for name in expected if not (path / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{path}: not a Lumina pipeline folder, missing {', '.join(m + '/' for m in missing)} "
                f"(expected {', '.join(c + '/' for c in expected)})"
            )
        placed = dict(mesh=mesh, progress=progress)
        if transformer == "load":
            transformer = load_transformer(path / "transformer", dtype, **placed)
        text_encoder = text_encoder_family(path / "text_encoder").load(path / "text_encoder", dtype, **placed)
        vae = None
        if "vae" in expected:
            vae_family = autoencoder_family(path / "vae")
            if vae_dtype is None:
                vae_dtype = "float32" if vae_family.find(path / "vae").config.force_upcast else dtype
            vae = vae_family.load(path / "vae", vae_dtype, **placed)
        tokenizer = text_encoder.config.load_tokenizer(path / "tokenizer")
        pipe = cls(transformer, text_encoder, vae, tokenizer, scheduler_shift=_scheduler_shift(path))
        return pipe if mesh is None else pipe.shard(mesh)

    @classmethod
    def abstract(
        cls, path_or_name: str | Path, dtype: str = "bfloat16", *, vae_dtype: str | None = None
    ) -> "LuminaPipeline":
        """The pipeline's architecture without weights, from a folder's config files alone
        (model_index.json and each component's config.json) or a name of `RELEASED`. Its programs
        can be lowered and compiled (`lower`), for a TPU say, on a machine without one; not run."""
        if released := released_architecture(path_or_name):
            transformer_config, encoder_config, vae_config = released
            shift = None
        else:
            path = Path(path_or_name)
            if not (path / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"{path}: not a pipeline folder (no model_index.json) and not a released pipeline "
                    f"({', '.join(RELEASED)})"
                )
            config = lambda folder, kind, name: read_config(path / folder / "config.json", kind.from_dict, name)  # noqa: E731
            transformer_config = read_config(path / "transformer" / "config.json", config_from_dict, TRANSFORMER.name)
            encoder_family = text_encoder_family(path / "text_encoder")
            encoder_config = config("text_encoder", encoder_family.config, encoder_family.name)
            vae_family = autoencoder_family(path / "vae") if has_vae(path) else None
            vae_config = vae_family and config("vae", vae_family.config, vae_family.name)
            shift = _scheduler_shift(path)
        compute = resolve_dtype(dtype)
        if vae_config is not None and vae_dtype is None:
            vae_dtype = "float32" if vae_config.force_upcast else dtype

        def shapes(model, config, dtype):
            return nnx.eval_shape(lambda: model(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))

        pipe = cls(
            shapes(MODELS[type(transformer_config)], transformer_config, compute),
            shapes(text_encoder_model(encoder_config), encoder_config, compute),
            None if vae_config is None else shapes(autoencoder_model(vae_config), vae_config, resolve_dtype(vae_dtype)),
            None,
            scheduler_shift=shift,
        )
        pipe.weightless = True
        return pipe

    def load_lora_weights(
        self, path: str | os.PathLike, scale: float = 1.0, *, adapter_name: str | None = None, merge: bool = True
    ) -> "LuminaPipeline":
        """Apply a LoRA file (or a folder holding pytorch_lora_weights.safetensors) at strength `scale`. It may be
        in diffusers' (PEFT), ComfyUI's / ai-toolkit's or kohya's layout (`lumina_jax.weights.lora`).

        merge=True merges it into the transformer's weights: no cost per step, and several merge one after
        another. merge=False keeps it beside them as `adapter_name` (default: the file's name): each adapted layer
        computes its low-rank path too, and `set_adapters` changes the strengths of the adapters kept so without
        recompiling the sampler. Returns the pipeline."""
        self._check_can_sample()
        if merge:
            merge_lora(self.transformer, path, scale)
            return self
        name = adapter_name or Path(path).stem
        if name in self.lora_adapters:
            raise ValueError(f"an adapter named {name!r} is loaded already; give another adapter_name")
        self.lora_adapters[name] = attach_lora(self.transformer, path, scale)
        if self.mesh is not None:  # the new adapters laid out as their layers are
            shard_module(self.transformer, self.mesh)
        return self

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] = 1.0) -> None:
        """The strengths of the unmerged adapters (`load_lora_weights(merge=False)`), as diffusers' set_adapters:
        the named ones at their weights, every other one off (0). Variables change, not the compiled programs."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        unknown = sorted(set(names) - set(self.lora_adapters))
        if unknown or len(weights) != len(names):
            raise ValueError(
                f"set_adapters({names}, {weights}): adapters loaded unmerged are {sorted(self.lora_adapters)}"
                + (f"; unknown {unknown}" if unknown else "; give one weight per name")
            )
        strengths = dict(zip(names, weights))
        for name, attached in self.lora_adapters.items():
            attached.set_scale(self.transformer, strengths.get(name, 0.0))

    def shard(self, mesh: Mesh) -> "LuminaPipeline":
        """Run on a device mesh: the transformer's and text encoder's parameters laid out by the
        sharding rules, the VAE's replicated (its axes name no mesh axis), and each call's images
        spread over the mesh's batch axes. Returns the pipeline."""
        for module in (self.transformer, self.text_encoder, self.vae):
            if module is not None:
                shard_module(module, mesh)
        self._text_encoder_split = nnx.split(self.text_encoder)
        self._vae_split = None if self.vae is None else nnx.split(self.vae)
        self.mesh = mesh
        return self.offload_text_encoder() if self.text_encoder_offloaded else self

    def offload_text_encoder(self) -> "LuminaPipeline":
        """Keep the text encoder's weights in host memory (pinned) and copy them onto the accelerator
        only while prompts are encoded: the sampler and the decoder get their memory (Gemma-2B: 4.7 GiB
        in bfloat16), for one copy of them per call. The same numbers. Returns the pipeline."""
        graphdef, params = self._text_encoder_split
        host = _in_memory(params, "pinned_host")
        nnx.update(self.text_encoder, host)
        self._text_encoder_split = (graphdef, host)
        self.text_encoder_offloaded = True
        return self

    def _text_encoder_params(self):
        """The text encoder's weights on the accelerator (a copy for this call, if they wait on the host)."""
        params = self._text_encoder_split[1]
        return _in_memory(params, "device") if self.text_encoder_offloaded else params

    def _on_mesh(self):
        """The pipeline's mesh as JAX's current one while its programs are traced and run: fused
        attention kernels split their work by it (`models.attention`)."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _spread(self, array: jax.Array) -> jax.Array:
        return jax.device_put(array, rows_sharding(self.mesh, array.shape[0]))

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """As diffusers: prompts padded to a multiple of 8 (at most 256 tokens, truncation warned)."""
        tokens = self.tokenizer(
            texts,
            pad_to_multiple_of=8,
            max_length=MAX_SEQUENCE_LENGTH,
            truncation=True,
            padding=True,
            return_tensors="np",
        )
        full = self.tokenizer(texts, padding="longest", return_tensors="np").input_ids
        if full.shape[-1] > tokens.input_ids.shape[-1]:
            removed = self.tokenizer.batch_decode(full[:, MAX_SEQUENCE_LENGTH - 1 : -1])
            logger.warning(f"captions have at most {MAX_SEQUENCE_LENGTH} tokens; this part was truncated: {removed}")
        return tokens.input_ids, tokens.attention_mask

    def _tokenize_negatives(self, texts: list[str], prompt_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each negative prompt cut, as diffusers cuts it, to the length its prompt pads to alone (its
        tokens rounded up to 8), then padded to the prompts' length: a row never depends on the
        other prompts of its call (diffusers cuts every negative to the longest prompt's length)."""
        own_length = -(-prompt_mask.sum(axis=1) // 8) * 8
        ids = np.full(prompt_mask.shape, self.tokenizer.pad_token_id or 0, np.int64)
        mask = np.zeros(prompt_mask.shape, np.int64)
        for row, (text, length) in enumerate(zip(texts, own_length)):
            tokens = self.tokenizer(text, max_length=int(length), truncation=True, return_tensors="np")
            ids[row, : tokens.input_ids.shape[1]] = tokens.input_ids[0]
            mask[row, : tokens.input_ids.shape[1]] = tokens.attention_mask[0]
        return ids, mask

    def _encode(self, params, ids: np.ndarray, mask: np.ndarray, bucket: int) -> tuple[jax.Array, jax.Array]:
        pad = bucket - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=self.tokenizer.pad_token_id or 0)
        mask = np.pad(mask, ((0, 0), (0, pad)))
        # On a mesh, the prompts are data-parallel over its batch axes, as images are.
        place = jnp.asarray if self.mesh is None else self._spread
        ids, mask = place(ids), place(mask)
        with self._on_mesh():
            embeds = _encode_text(self._text_encoder_split[0], params, ids, mask)
        return embeds, mask

    def encode_texts(self, texts: list[str]) -> tuple[jax.Array, jax.Array]:
        """Caption features and masks of texts tokenised as they are (no system prompt, no cleaning: the
        training cache gives them the family's `training_captions`), padded to one length bucket."""
        ids, mask = self._tokenize(texts)
        return self._encode(self._text_encoder_params(), ids, mask, caption_bucket(ids.shape[1]))

    def encode_prompt(
        self, prompt: list[str], negative_prompt: list[str] | None, system_prompt: str | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
        """Caption features and masks of the prompts (after `system_prompt`, for a family that has one; and
        negative prompts, as typed: the references neither clean them nor give them a system prompt), padded
        to one length bucket."""
        config = self.text_encoder.config
        captions = config.prepare_captions(prompt, system_prompt)
        if negative_prompt is None:
            return *self.encode_texts(captions), None, None
        ids, mask = self._tokenize(captions)
        params = self._text_encoder_params()
        if config.negatives_cut_to_prompts:
            neg_ids, neg_mask = self._tokenize_negatives(negative_prompt, mask)
        else:
            neg_ids, neg_mask = self._tokenize(negative_prompt)
        bucket = caption_bucket(max(ids.shape[1], neg_ids.shape[1]))
        return *self._encode(params, ids, mask, bucket), *self._encode(params, neg_ids, neg_mask, bucket)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        *,
        num_images_per_prompt: int = 1,
        seed: int | list[int] = 0,
        latents: np.ndarray | jax.Array | None = None,
        prompt_embeds: jax.Array | None = None,
        prompt_attention_mask: jax.Array | None = None,
        negative_prompt_embeds: jax.Array | None = None,
        negative_prompt_attention_mask: jax.Array | None = None,
        output_type: Literal["pil", "np", "latent"] = "pil",
        clean_caption: bool = True,  # accepted as diffusers does; without bs4 and ftfy it only lower-cases
        image=None,
        strength: float = 1.0,
        region_prompts: list[str] | None = None,
        grid: tuple[int, int] | None = None,
        system_prompt: str | None = None,
        options: sampling.SamplerOptions | None = None,
        **sampler_options,
    ) -> LuminaPipelineOutput:
        """Images for the prompts, in stages each usable alone: `check_inputs`, `encode_captions`,
        `prepare_latents`, `sample`, `decode`.

        How to sample is `options` (default `sampling.SamplerOptions()`), any of its fields also given by
        name, as diffusers names them where it has them: num_inference_steps, guidance_scale, sigmas,
        scaling_watershed, proportional_attn, cfg_trunc_ratio, cfg_normalization; and solver, schedule, shift,
        cfg_all_channels, context_drop. schedule, shift, scaling_watershed, cfg_all_channels and
        cfg_normalization default to the family's reference (`sampler_defaults`); shift, when given, replaces
        the scheduler config's time shift, which applies to the diffusers schedules and the family's own
        (`schedule="shifted"` on Lumina-Next: 4, as its demo). cfg_trunc_ratio and cfg_normalization are
        Lumina2Pipeline's and mean the same for every family: guidance only at the steps i (from 0) with
        (i + 1) / num_inference_steps <= cfg_trunc_ratio, and the guided velocity rescaled to the
        conditional one's norm over the latents' last axis (on by default for Lumina-Image 2.0 only). The
        original Lumina-Image 2.0 sampler's are cfg_trunc and renorm_cfg (`sampling.SamplerOptions`; its whole
        recipe: `models.lumina2.ORIGINAL_SAMPLING`).

        Image-to-image, as the original Lumina-Next's sample_img2img.py: `image` (one for every prompt, or
        a list of one per prompt; PIL images, file names or [H, W, 3] arrays) is resized to height x width
        (default: its own size), encoded by the VAE (a posterior sample, seeded by `seed`), and the flow
        starts from t0 * image + (1 - t0) * noise at the grid point that `strength` cuts the schedule at
        (`FlowSchedule.image_to_image_start`): 1 ignores the image, 0 returns its VAE round trip. A new
        strength or image of the same size reuses the compiled programs.

        Compositional generation, as Lumina-T2X's lumina_next_compositional_generation: `region_prompts`,
        one caption per cell of a `grid` (rows, cols; default one row), numbered row by row, each cell's
        image tokens attending to their own caption only; `prompt` is the global caption (its mean
        conditions the model, as the original's). Next-DiT only; the same regions for every prompt. New
        captions of the same lengths reuse the compiled programs.

        `system_prompt` (Lumina-Image 2.0, as Lumina2Pipeline's): the text each prompt follows, instead of
        the default (`models.gemma2.SYSTEM_PROMPTS["real"]`; the original's other ones are there too)."""
        self._check_can_sample()
        options = _sampler_options(options, sampler_options)
        image = _read_images(image)
        if image is not None:
            first_image = image[0] if isinstance(image, list) else image
            own_width, own_height = (
                first_image.size if isinstance(first_image, Image.Image) else np.shape(first_image)[1::-1]
            )
            height, width = height or own_height, width or own_width
        height = height or self.default_sample_size
        width = width or self.default_sample_size
        try:
            self.check_inputs(
                prompt,
                negative_prompt,
                height,
                width,
                options=options,
                num_images_per_prompt=num_images_per_prompt,
                seed=seed,
                prompt_embeds=prompt_embeds,
                output_type=output_type,
                image=image,
                strength=strength,
                region_prompts=region_prompts,
                grid=grid,
                system_prompt=system_prompt,
            )
        except ValueError as e:
            if image is None or "height and width" not in str(e):
                raise
            raise ValueError(f"{e}; pass height= and width= to resize the image to such a size") from None
        conditioning = self.encode_captions(
            prompt,
            negative_prompt,
            guided=options.guided,
            num_images_per_prompt=num_images_per_prompt,
            prompt_embeds=prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            region_prompts=region_prompts,
            grid=grid,
            height=height,
            width=width,
            system_prompt=system_prompt,
        )
        latents, options = self.prepare_latents(
            conditioning.images(options.guided),
            height,
            width,
            seed=seed,
            latents=latents,
            image=image,
            strength=strength,
            num_images_per_prompt=num_images_per_prompt,
            options=options,
        )
        return LuminaPipelineOutput(self.decode(self.sample(latents, conditioning, options), output_type))

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        *,
        options: sampling.SamplerOptions = sampling.SamplerOptions(),
        num_images_per_prompt: int = 1,
        seed: int | list[int] = 0,
        prompt_embeds: jax.Array | None = None,
        output_type: str = "pil",
        image=None,
        strength: float = 1.0,
        region_prompts: list[str] | None = None,
        grid: tuple[int, int] | None = None,
        system_prompt: str | None = None,
    ) -> None:
        """Raise TypeError or ValueError, before any work, for arguments of `__call__` it cannot draw with."""
        if image is None and strength != 1.0:
            raise ValueError("strength is for image-to-image: pass image= (a PIL image or an array) with it")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either prompt or prompt_embeds (with prompt_attention_mask), not both or neither")
        _check_texts("prompt", prompt)
        if prompt is not None and not isinstance(prompt, str) and len(prompt) == 0:
            raise ValueError("prompt is an empty list; give at least one prompt")
        if not all(isinstance(side, numbers.Integral) and not isinstance(side, bool) for side in (height, width)):
            raise TypeError(f"height and width must be whole numbers of pixels, got {height!r} and {width!r}")
        self.check_size(height, width)
        guidance_scale = options.guidance_scale
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 or less turns guidance off), got {guidance_scale}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        _check_texts("negative_prompt", negative_prompt)
        if system_prompt is not None:
            if not isinstance(system_prompt, str):
                raise TypeError(f"system_prompt must be a string, got {system_prompt!r:.80}")
            self.text_encoder.config.prepare_captions([], system_prompt)  # a family without one says so
        if options.context_drop != 1:  # its windows must tile the token grid
            self.check_size(height, width, context_drop=options.context_drop)
        _checked_seed(seed)
        if region_prompts is not None and prompt_embeds is not None:
            raise ValueError("region_prompts take prompt (the global caption), not prompt_embeds")
        if grid is not None and region_prompts is None:
            raise ValueError("grid is for compositional generation: pass region_prompts with it")

    def encode_captions(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        guided: bool = True,
        num_images_per_prompt: int = 1,
        prompt_embeds: jax.Array | None = None,
        prompt_attention_mask: jax.Array | None = None,
        negative_prompt_embeds: jax.Array | None = None,
        negative_prompt_attention_mask: jax.Array | None = None,
        region_prompts: list[str] | None = None,
        grid: tuple[int, int] | None = None,
        height: int | None = None,
        width: int | None = None,
        system_prompt: str | None = None,
    ) -> Conditioning:
        """The sampler's caption rows: the prompts' features (`encode_prompt`), or the embeddings given,
        each prompt's repeated for its images; guided (guidance_scale > 1), then each image's negative
        prompt's (default ""). With `region_prompts` on a `grid`, the regional rows of images of height x
        width pixels (`regions.regional_captions`)."""
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negatives = None
            if guided:
                negatives = negative_prompt if negative_prompt is not None else ""
                negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
                if len(negatives) != len(prompts):
                    raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            cells = list(region_prompts or [])  # encoded with the prompts: one caption length for all
            negatives = None if negatives is None else negatives + [""] * len(cells)
            embeds, mask, neg_embeds, neg_mask = self.encode_prompt(prompts + cells, negatives, system_prompt)
            if cells:
                cell_embeds, cell_mask = np.asarray(embeds[len(prompts) :]), np.asarray(mask[len(prompts) :])
                embeds, mask = embeds[: len(prompts)], mask[: len(prompts)]
                if guided:
                    neg_embeds, neg_mask = neg_embeds[: len(prompts)], neg_mask[: len(prompts)]
        else:
            embeds, mask = jnp.asarray(prompt_embeds), jnp.asarray(prompt_attention_mask)
            neg_embeds, neg_mask = negative_prompt_embeds, negative_prompt_attention_mask
            if guided and (neg_embeds is None or neg_mask is None):
                raise ValueError("with prompt_embeds and guidance_scale > 1, pass negative_prompt_embeds and its mask")

        # each prompt's images side by side: prompt 0 x n, prompt 1 x n, ... (embeddings and masks alike)
        def per_image(a):
            return None if a is None else jnp.repeat(jnp.asarray(a), num_images_per_prompt, axis=0)

        embeds, mask, neg_embeds, neg_mask = map(per_image, (embeds, mask, neg_embeds, neg_mask))
        caption = jnp.concatenate([embeds, neg_embeds]) if guided else embeds
        caption_mask = jnp.concatenate([mask, neg_mask]) if guided else mask
        if region_prompts is None:
            return Conditioning(caption, caption_mask)
        grid = grid or (1, len(region_prompts))
        if len(region_prompts) != grid[0] * grid[1]:
            raise ValueError(f"{len(region_prompts)} region prompts for a {grid[0]}x{grid[1]} grid; give one a cell")
        cell_of = self._cells(height, width, grid)
        negative = lambda i: (np.asarray(neg_embeds[i]), np.asarray(neg_mask[i])) if guided else (None, None)  # noqa: E731
        rows = [
            regions.regional_captions(
                np.asarray(embeds[i]), np.asarray(mask[i]), cell_embeds, cell_mask, *negative(i), cell_of
            )
            for i in range(embeds.shape[0])
        ]
        # the guided rows of every image, then the negative rows, as the sampler takes them
        return Conditioning(
            *(
                jnp.asarray(np.concatenate([row[part][:1] for row in rows] + [row[part][1:] for row in rows]))
                for part in range(3)
            )
        )

    def prepare_latents(
        self,
        batch: int,
        height: int,
        width: int,
        *,
        seed: int | list[int] = 0,
        latents: np.ndarray | jax.Array | None = None,
        image=None,
        strength: float = 1.0,
        num_images_per_prompt: int = 1,
        options: sampling.SamplerOptions = sampling.SamplerOptions(),
    ) -> tuple[jax.Array, sampling.SamplerOptions]:
        """The sampler's start for `batch` images of height x width, and the options to sample from it:
        `latents` as given, else the noise of `seed` (one, or one per image: each image as its seed draws
        it alone). Image-to-image (`image`: one, or one per prompt of num_images_per_prompt images): that
        noise moved toward the image's latents, to where `strength` cuts the options' schedule, which the
        returned options start from (their first_step)."""
        seed = _checked_seed(seed)
        shape = self._latent_shape(batch, height, width)
        if latents is None and isinstance(seed, int):
            latents = _noise(jnp.uint32(seed), shape)
        elif latents is None:  # one seed per image: each image as its seed draws it alone
            if len(seed) != batch:
                raise ValueError(f"{len(seed)} seeds for {batch} images; give one seed, or one per image")
            latents = _noise_per_image(jnp.asarray(seed, jnp.uint32), shape[1:])
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
        latents = jnp.asarray(latents)
        if image is None:
            return latents, options
        schedule, _ = self._schedule(options)
        first_step, t0 = schedule.image_to_image_start(strength)
        start = self._image_latents(
            _read_images(image), batch // num_images_per_prompt, num_images_per_prompt, shape, seed
        )
        return sampling.start_from_image(latents, start, t0), dataclasses.replace(options, first_step=first_step)

    def sample(
        self,
        latents: jax.Array,
        conditioning: Conditioning,
        options: sampling.SamplerOptions = sampling.SamplerOptions(),
    ) -> jax.Array:
        """The flow ODE from `latents` (`prepare_latents`) to the data latents [B, C, h, w] (float32), with
        the caption rows of `encode_captions`: over the options' schedule, with their watershed (unset:
        the family's, `_sampler`)."""
        self._check_can_sample()
        schedule, options = self._schedule(options)
        caption, caption_mask, caption_regions = conditioning
        latents = jnp.asarray(latents)
        if self.mesh is not None:
            latents, caption, caption_mask = map(self._spread, (latents, caption, caption_mask))
            caption_regions = None if caption_regions is None else self._spread(caption_regions)
        with self._on_mesh():
            return sampling.sample(
                self.transformer,
                latents,
                caption,
                caption_mask,
                schedule,
                options=options,
                caption_regions=caption_regions,
            )

    def decode(self, latents: jax.Array, output_type: Literal["pil", "np", "latent"] = "pil"):
        """The sampler's latents as images: PIL images ("pil"), [B, H, W, 3] floats in [0, 1] ("np"), or
        the latents themselves ("latent", [B, C, h, w]); through the VAE, or in pixel space as they are."""
        if output_type == "latent":
            return np.asarray(latents)
        with self._on_mesh():
            if self.vae is None:  # pixel space: the latents are the image, grey ones shown as RGB
                images = latents if latents.shape[1] == 3 else jnp.repeat(latents[:, :1], 3, axis=1)
            else:
                images = _decode(*self._vae_split, self.vae.config.unscale_latents(latents))
        images = jnp.clip(images.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)
        if not images.is_fully_addressable:  # a mesh over several processes: each gets every image
            images = multihost_utils.process_allgather(images, tiled=True)
        images = np.asarray(images).transpose(0, 2, 3, 1)
        if output_type == "np":
            return images
        return [Image.fromarray(i) for i in (images * 255).round().astype(np.uint8)]

    def lower(
        self,
        *,
        height: int | None = None,
        width: int | None = None,
        prompts: int = 1,
        num_images_per_prompt: int = 1,
        caption_length: int = MAX_SEQUENCE_LENGTH,
        options: sampling.SamplerOptions | None = None,
        **sampler_options,
    ) -> dict[str, tuple[jax.stages.Lowered, nnx.Module | None]]:
        """Every program that a call with these settings runs, lowered for the pipeline's mesh (`shard`)
        or default device, with the model whose weights each reads: for `prompts` prompts of
        `caption_length` tokens (padded to their bucket), the text encoder, the noise, the sampler
        and, with a VAE, the decoder. The sampler's options as `__call__` takes them. The weights may be
        abstract (`abstract`): compile the programs for a TPU topology to see what they need per chip
        (`lumina_jax.tpu`)."""
        options = _sampler_options(options, sampler_options)
        height = height or self.default_sample_size
        width = width or self.default_sample_size
        self.check_inputs(
            "", None, height, width, options=options, num_images_per_prompt=num_images_per_prompt, output_type="latent"
        )
        if not 1 <= caption_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"caption_length must be between 1 and {MAX_SEQUENCE_LENGTH} tokens, got {caption_length}")
        if prompts < 1:
            raise ValueError(f"prompts must be at least 1, got {prompts}")
        everywhere = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

        def struct(shape, dtype, sharded_rows: bool = True):
            where = rows_sharding(self.mesh, shape[0]) if self.mesh is not None and sharded_rows else everywhere
            return jax.ShapeDtypeStruct(shape, dtype, sharding=where)

        batch = prompts * num_images_per_prompt
        rows = batch * (2 if options.guided else 1)
        bucket = caption_bucket(caption_length)
        shape = self._latent_shape(batch, height, width)
        tokens = struct((prompts, bucket), jnp.int32, sharded_rows=False)
        schedule, options = self._schedule(options)
        with self._on_mesh():
            encode = _encode_text.lower(self._text_encoder_split[0], self._text_encoder_params(), tokens, tokens)
            features = encode.out_info
            caption = struct((rows, bucket, features.shape[-1]), features.dtype)
            caption_mask = struct((rows, bucket), jnp.int32)
            latents = struct(shape, jnp.float32)
            programs = {
                "text_encoder": (encode, self.text_encoder),
                "noise": (_noise.lower(np.uint32(0), shape), None),
                "sampler": (
                    sampling.lower_sample(self.transformer, latents, caption, caption_mask, schedule, options),
                    self.transformer,
                ),
            }
            if self.vae is not None:
                programs["decoder"] = (_decode.lower(*self._vae_split, struct(shape, jnp.float32)), self.vae)
        return programs

    def _check_can_sample(self) -> None:
        if self.transformer is None:
            raise ValueError("this pipeline was loaded with transformer=None: it can encode prompts but not sample")
        if self.weightless:
            raise ValueError(
                "this pipeline has no weights (LuminaPipeline.abstract): lower its programs with "
                ".lower(...), or load one with from_pretrained"
            )

    def _latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, self.transformer.config.in_channels, height // self.latent_scale, width // self.latent_scale)

    def _schedule(self, options: sampling.SamplerOptions) -> tuple[sampling.FlowSchedule, sampling.SamplerOptions]:
        """The schedule the options make, and the options with their watershed and guidance choices set
        (`_sampler`; the family's where unset)."""
        schedule, scaling_watershed = self._sampler(
            options.schedule, options.num_inference_steps, options.shift, options.scaling_watershed, options.sigmas
        )
        defaults = self.sampler_defaults(options.renorm_cfg)
        guidance = {
            name: defaults.get(name, False) if getattr(options, name) is None else getattr(options, name)
            for name in ("cfg_all_channels", "cfg_normalization")
        }
        return schedule, dataclasses.replace(options, scaling_watershed=scaling_watershed, **guidance)

    def _image_latents(self, image, prompts: int, per_prompt: int, shape: tuple[int, ...], seed) -> jax.Array:
        """The images' latents [B, C, h, w] (each prompt's repeated for its images): a VAE posterior sample,
        its noise from each image's seed (another stream than the sampler's), or in pixel space the pixels."""
        images = list(image) if isinstance(image, (list, tuple)) else [image] * prompts
        if len(images) != prompts:
            raise ValueError(f"{len(images)} images for {prompts} prompts; give one image, or one per prompt")
        height, width = shape[2] * self.latent_scale, shape[3] * self.latent_scale
        pixels = np.repeat(np.stack([load_image(i, height, width) for i in images]), per_prompt, axis=0)
        if self.vae is None:  # pixel space: the image is the latent, in grey as the training data is
            return jnp.asarray(pixels if shape[1] == 3 else pixels.mean(axis=1, keepdims=True))
        if isinstance(seed, int):
            noise = _noise(jnp.uint32(seed), shape, 1)
        else:
            noise = _noise_per_image(jnp.asarray(seed, jnp.uint32), shape[1:], 1)
        pixels = jnp.asarray(pixels)
        if self.mesh is not None:
            pixels, noise = self._spread(pixels), self._spread(noise)
        with self._on_mesh():
            return _encode_image(*self._vae_split, pixels.astype(self.vae.dtype), noise)

    def sampler_defaults(self, renorm_cfg: float = 0.0) -> dict:
        """How the family's reference samples (its schedule and watershed): Lumina-Next as diffusers does,
        Lumina-T2I as its demo does (the transformer config's `sampler_defaults`). With the original Lumina-Image
        2.0 sampler's cap (renorm_cfg > 0) no diffusers renormalisation: the cap replaces it."""
        defaults = self.transformer.config.sampler_defaults()
        return defaults | dict(cfg_normalization=False) if renorm_cfg > 0 else defaults

    def _sampler(
        self, schedule, num_steps, shift, scaling_watershed, sigmas=None
    ) -> tuple[sampling.FlowSchedule, float]:
        """The schedule and watershed of a call: the given ones, else the family's (`sampler_defaults`); the
        shift the given one, else the scheduler config's for the diffusers schedules and the family's own
        (Lumina-T2I's folders keep the demo's shift there), else the schedule's default (shifted: 4)."""
        defaults = self.sampler_defaults()
        schedule = schedule or defaults["schedule"]
        if shift is None and schedule in ("diffusers", "lumina2", defaults["schedule"]):
            shift = self.scheduler_shift
        steps = sampling.make_schedule(schedule, num_steps, shift=shift, sigmas=sigmas)
        return steps, defaults["scaling_watershed"] if scaling_watershed is None else scaling_watershed

    def _cells(self, height: int, width: int, grid: tuple[int, int]) -> np.ndarray:
        """The grid cell of each image token at this size (`regions.cell_of_tokens`), for a family that takes
        regional captions (Next-DiT)."""
        config = self.transformer.config
        if not config.takes_regions:
            raise ValueError(
                f"regional captions are Lumina-Next's (Next-DiT); this pipeline holds a {config.family_name}"
            )
        unit = self.latent_scale * self.transformer.config.patch_size
        return regions.cell_of_tokens(height // unit, width // unit, grid)

    def check_size(self, height: int, width: int, grid: tuple[int, int] | None = None, context_drop: int = 1) -> None:
        """Raise ValueError unless the model can draw images of this size (pixels), split into `grid` cells
        of whole tokens for regional captions, and into Context Drop's context_drop x context_drop windows."""
        if grid is not None:
            self._cells(height, width, grid)
        unit = self.latent_scale * self.transformer.config.patch_size
        self.transformer.config.check_size(height, width, unit, context_drop)
        rows, cols = height // unit, width // unit
        windows = [w for w in range(1, min(rows, cols) + 1) if rows % w == 0 and cols % w == 0]
        if context_drop not in windows:
            raise ValueError(
                f"context_drop must divide both sides of the {rows}x{cols} token grid of {height}x{width} px "
                f"(one of {windows}), got {context_drop!r}"
            )
