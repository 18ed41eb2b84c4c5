"""Configuration of the compressed model: a BART config whose ``d_model`` is the latent width."""

from __future__ import annotations

from typing import Any

from transformers import BartConfig

AUTOENCODER_VARIANTS = ("paper", "token")

# The paper's CNN/DailyMail generation settings (beam search; lengths count the decoder start token).
PAPER_GENERATION = {
    "num_beams": 4,
    "length_penalty": 2.0,
    "no_repeat_ngram_size": 3,
    "min_length": 55,
    "max_length": 144,
    "early_stopping": True,
}


class CompressedBartConfig(BartConfig):
    """BART config for the compressed model.

    ``d_model`` is the *decoder* width and always equals ``latent_sizes[-1]``: the decoder's
    cross-attention reads the compressed memory directly, so both widths must agree. The encoder
    keeps the base model's width (``encoder_d_model``), heads and FFN size.

    Args:
        encoder_d_model: width of the pretrained BART encoder (768 for bart-base).
        latent_sizes: output widths of the autoencoder's projections, strictly decreasing,
            e.g. ``[576, 480, 384]`` (the paper's 384 model) or ``[640, 576, 504]``.
        autoencoder_variant: ``"paper"`` normalizes over positions with BatchNorm1d exactly as the
            original code (inputs padded to ``autoencoder_max_positions`` while training);
            ``"token"`` normalizes each token's features with LayerNorm and accepts any length.
        autoencoder_max_positions: the ``paper`` variant's BatchNorm size (the max source length).
    """

    model_type = "compressed_bart"

    def __init__(
        self,
        encoder_d_model: int = 768,
        latent_sizes: list[int] | tuple[int, ...] = (576, 480, 384),
        autoencoder_variant: str = "paper",
        autoencoder_max_positions: int | None = None,
        **kwargs: Any,
    ) -> None:
        latent_sizes = [int(size) for size in latent_sizes]
        kwargs["d_model"] = latent_sizes[-1] if latent_sizes else kwargs.get("d_model", 0)
        if kwargs.get("id2label") is None:
            # transformers omits id2label from config.json for 2 labels, while BartConfig defaults
            # to 3: without this a saved binary classifier would not load.
            kwargs.setdefault("num_labels", 2)
        super().__init__(**kwargs)
        self.encoder_d_model = int(encoder_d_model)
        self.latent_sizes = latent_sizes
        self.autoencoder_variant = autoencoder_variant
        self.autoencoder_max_positions = int(autoencoder_max_positions or self.max_position_embeddings)
        validate_compression(self)

    @property
    def latent_size(self) -> int:
        return self.latent_sizes[-1]

    def encoder_config(self) -> BartConfig:
        """The config of the base-width BART encoder (everything equal except ``d_model``)."""
        fields = self.to_dict()
        for key in ("encoder_d_model", "latent_sizes", "autoencoder_variant", "autoencoder_max_positions"):
            fields.pop(key, None)
        fields.pop("model_type", None)
        fields["d_model"] = self.encoder_d_model
        return BartConfig(**fields)

    @classmethod
    def from_base_config(
        cls,
        base: BartConfig,
        latent_sizes: list[int] | tuple[int, ...],
        autoencoder_variant: str = "paper",
        autoencoder_max_positions: int | None = None,
        decoder_attention_heads: int | None = None,
    ) -> CompressedBartConfig:
        """Derive the compressed config from a base BART config (heads, layers, FFN, vocab kept).

        ``decoder_attention_heads`` overrides the base's head count for latent sizes it does not
        divide (e.g. 8 heads for a 256- or 128-wide decoder of bart-base, whose 12 heads need 384/504).
        """
        if getattr(base, "model_type", None) != "bart":
            raise ValueError(
                f"the base model must be a BART checkpoint (config model_type 'bart'), got "
                f"{getattr(base, 'model_type', type(base).__name__)!r}; pass a BART model such as "
                "facebook/bart-base or a local directory holding one"
            )
        fields = base.to_dict()
        for key in ("model_type", "d_model", "architectures", "transformers_version"):
            fields.pop(key, None)
        if decoder_attention_heads is not None:
            fields["decoder_attention_heads"] = decoder_attention_heads
        return cls(
            encoder_d_model=base.d_model,
            latent_sizes=list(latent_sizes),
            autoencoder_variant=autoencoder_variant,
            autoencoder_max_positions=autoencoder_max_positions,
            **fields,
        )


def validate_compression(config: CompressedBartConfig) -> None:
    """Reject settings that cannot build a working model, naming the fix."""
    sizes = config.latent_sizes
    if not sizes:
        raise ValueError("latent_sizes is empty; give at least one size, e.g. [576, 480, 384]")
    widths = [config.encoder_d_model, *sizes]
    for wider, narrower in zip(widths, widths[1:], strict=False):
        if narrower >= wider:
            raise ValueError(
                f"latent_sizes must be strictly decreasing and smaller than the base d_model "
                f"({config.encoder_d_model}); got {sizes}. Example for bart-base: [576, 480, 384]"
            )
    if sizes[-1] <= 0:
        raise ValueError(f"latent sizes must be positive, got {sizes}")
    if sizes[-1] % config.decoder_attention_heads:
        raise ValueError(
            f"the latent size {sizes[-1]} is not divisible by decoder_attention_heads "
            f"({config.decoder_attention_heads}); pick a multiple of it (e.g. 384 or 504 for 12 heads) or set "
            "the decoder's head count (--decoder-heads 8 for 256 or 128)"
        )
    if config.autoencoder_variant not in AUTOENCODER_VARIANTS:
        raise ValueError(
            f"autoencoder_variant must be one of {AUTOENCODER_VARIANTS}, got {config.autoencoder_variant!r}"
        )
    if config.autoencoder_max_positions > config.max_position_embeddings:
        raise ValueError(
            f"autoencoder_max_positions ({config.autoencoder_max_positions}) exceeds the encoder's "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
