"""What a model family tells its callers, in one place: the pipeline, the sampler, training and the
weights code ask these of a config or model and never branch on its class.

A new transformer, text-encoder or autoencoder family implements these on its own config and model classes,
in its own modules, and registers itself once: `weights.nextdit.ARCHITECTURES` for a transformer,
`weights.text_encoder.TEXT_ENCODERS` for a text encoder, `weights.vae.AUTOENCODERS` for an autoencoder.
tests/test_families.py checks that no other module asks for a concrete family by `isinstance`.
"""

from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import numpy as np

# A transformer's token sequence: patches [B, T, C*p*p] in `patchify`'s feature order, each token's grid
# position [B, T, 2] (None for a family whose RoPE is by index), real tokens [B, T] bool, and end-of-line
# slots [B, T] bool (None for a family without them; they are not learned).
TokenSequence = tuple[Any, Any | None, Any, Any | None]


@runtime_checkable
class TransformerConfig(Protocol):
    """A diffusion transformer's config (`NextDiTConfig`, `FlagDiTConfig`, `UnifiedNextDiTConfig`); its defaults build
    a model, and its `to_dict` writes config.json with the class name that `weights.nextdit.config_from_dict` reads."""

    family_name: ClassVar[str]  # in messages: "Next-DiT"
    release: ClassVar[str]  # the released model it comes from: "Lumina-Next"
    pipeline_class: ClassVar[str]  # model_index.json's _class_name for a pipeline holding it
    takes_regions: ClassVar[bool]  # regional captions (compositional generation)
    takes_context_drop: ClassVar[bool]  # the paper's Context Drop
    patch_size: int
    sample_size: int

    @property
    def base_sequence_length(self) -> int | None:
        """Tokens at the training resolution: the base of proportional attention (None: the family has none)."""

    def sampler_defaults(self) -> dict[str, Any]:
        """How the family's reference samples: {"schedule": ..., "scaling_watershed": ...}, and where they
        are not False, "cfg_all_channels" and "cfg_normalization" (`sampling.SamplerOptions` fields all)."""

    def sequence_length(self, rows: int, cols: int) -> int:
        """Tokens of one image of rows x cols patches."""

    def forward_flops(self, image_tokens: int, caption_tokens: int) -> float:
        """One sample's forward matmul FLOPs (2 a multiply-add) at these sequence lengths: MFU's model FLOPs
        (`training.flops`)."""

    def token_sequence(self, latents: list[np.ndarray] | list[jax.Array], length: int | None = None) -> TokenSequence:
        """Latents [C, H_i, W_i] (sizes may differ) as the model's tokens, padded to the longest (or to
        `length` tokens: a run's one batch shape)."""

    def resolution_scale(self, height: int, width: int) -> float:
        """The RoPE factor for latents of height x width: > 1 means extrapolation."""

    def check_size(self, height: int, width: int, unit: int, context_drop: int = 1) -> None:
        """Raise ValueError unless the model draws images of height x width pixels, `unit` pixels a token."""


@runtime_checkable
class Transformer(Protocol):
    """A diffusion transformer (`NextDiT`, `FlagDiT`, `UnifiedNextDiT`): `__call__` on latents [B, C, H, W], and
    on tokens `forward_sequence`, whose first four arguments are `TransformerConfig.token_sequence`'s results."""

    config: TransformerConfig

    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_mask, **options) -> jax.Array: ...

    def forward_sequence(
        self, patches, positions, token_mask, end_of_line, timestep, caption, caption_mask
    ) -> jax.Array: ...

    def image_rope(self, height: int, width: int, *, linear_factor=..., ntk_factor=...) -> tuple: ...

    def caption_keys_values(self, caption: jax.Array, caption_mask: jax.Array) -> jax.Array:
        """What every step reads of the caption [B, L, D] (mask [B, L]); a family may not need the mask."""


@runtime_checkable
class TextEncoderConfig(Protocol):
    """A caption encoder's config (`GemmaConfig`, `Gemma2Config`, `LlamaConfig`)."""

    negatives_cut_to_prompts: ClassVar[bool]  # each negative prompt cut to its prompt's length, as the reference

    def prepare_captions(self, texts: list[str], system_prompt: str | None = None) -> list[str]:
        """Captions as the family's reference feeds them to its tokenizer; system_prompt (Lumina-Image 2.0's)
        replaces the default one, a ValueError for a family without."""

    def training_captions(self, texts: list[str]) -> list[str]:
        """Captions as the family's original trainer feeds them to its tokenizer; "" (caption dropout's) as is."""

    def load_tokenizer(self, folder):
        """The tokenizer in `folder`, set up as the family's reference sets it up."""


@runtime_checkable
class AutoencoderConfig(Protocol):
    """An image autoencoder's config (`AutoencoderKLConfig`: the SDXL VAE of Lumina-Next and Lumina-T2I, the
    FLUX VAE of Lumina-Image 2.0)."""

    latent_channels: int
    force_upcast: bool  # run in float32 whatever the pipeline's dtype, as diffusers does
    scaling_factor: float  # `scale_latents`' numbers, which a training cache records
    shift_factor: float | None

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side."""

    def scale_latents(self, latents):
        """A posterior sample as the transformer's latents."""

    def unscale_latents(self, latents):
        """The transformer's latents as the decoder takes them (`scale_latents` undone)."""


@runtime_checkable
class Autoencoder(Protocol):
    """An image autoencoder (`AutoencoderKL`): images [B, in_channels, H, W] in [-1, 1] to the posterior's mean
    and log-variance [B, latent_channels, H / f, W / f], and latents back to images."""

    config: AutoencoderConfig
    dtype: Any

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]: ...

    def decode(self, latents: jax.Array) -> jax.Array: ...
