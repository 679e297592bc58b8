"""One description per model family: where its parts are and what it supports.

A text family (seq2seq) says where its encoder and decoder layers, embeddings and final norm are, how its
encoder runs in two pieces (a frozen, cacheable prefix and the rest), what its attention
projections are called, where its decoder's cross-attention sits and which speed paths of
``vqadapt.speed`` it supports. A vision family says where its layers are and whether its patch
embeddings run apart from the layers (so that vision LoRA can cache them) and what runs before
its layers.

Adding a family is one class here, registered in ``TEXT_FAMILIES`` / ``VISION_FAMILIES``. Every
text family must run its encoder in two pieces: a model whose prefix cannot be split off is not
a supported text model (``text_family`` says so), never a silent fallback.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from vqadapt.errors import VQAConfigError

# Speed paths a family may support (see vqadapt.speed for what each does).
PACKED_ENCODER = "packed_encoder"
LEAN_DECODER = "lean_decoder"
ABSORBED_CROSS_ATTENTION = "absorbed_cross_attention"
HEAD_ON_LABELS = "head_on_labels"


def get_submodule(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def padding_mask(
    config,
    queries: torch.Tensor,
    attention_mask: torch.Tensor,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """The library's 4-D attention mask for a (B, N) padding mask over the keys (``queries``:
    (B, T, ...) for the shape only; ``keys``: cross-attention states). Always built: the
    library would skip a mask with no padding, but finding out reads the mask on the host,
    which on a GPU waits for every queued kernel in every call."""
    return create_bidirectional_mask(
        config=config,
        inputs_embeds=queries,
        attention_mask=attention_mask,
        encoder_hidden_states=keys,
        allow_is_bidirectional_skip=False,
    )


class TextFamily:
    """A seq2seq family. Subclasses fill in the class attributes and the encoder pieces."""

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = ""  # encoder layers, from the ``*ForConditionalGeneration`` root
    decoder_layers_path: ClassVar[str] = ""  # decoder layers, from the same root
    projections: ClassVar[tuple[str, str, str]] = ("q_proj", "k_proj", "v_proj")
    cross_attention: ClassVar[str | None] = None  # attribute of a decoder layer
    speed_paths: ClassVar[frozenset[str]] = frozenset()

    @property
    def name(self) -> str:
        return self.model_types[0]

    def encoder(self, text: nn.Module) -> nn.Module:
        return text.get_encoder()

    def embed(self, text: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Token (and position) embeddings of the encoder. They never train, so they run
        without dropout whether cached or not."""
        raise NotImplementedError

    def run_layers(
        self,
        text: nn.Module,
        layers: list[nn.Module],
        first: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Encoder layers ``first, first + 1, ...`` (the library's modules, padded batch)."""
        mask = padding_mask(self.encoder(text).config, hidden, attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    def final_norm(self, text: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the encoder applies after its last layer (identity when nothing)."""
        return hidden

    def decoder_start_token_id(self, config) -> int:
        start = config.decoder_start_token_id
        return int(config.eos_token_id if start is None else start)

    def decoder_hidden(
        self,
        text: nn.Module,
        batch: dict[str, torch.Tensor],
        states: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Final decoder states of a teacher-forced pass over ``batch["decoder_input_ids"]``
        attending to ``states`` where ``mask`` is 1 (the library's decoder)."""
        decoder = text.get_decoder()
        ids = batch["decoder_input_ids"]
        queries = states.new_empty((*ids.shape, 1))  # the decoder's (B, T): shape only
        return decoder(
            input_ids=ids,
            attention_mask=batch.get("decoder_attention_mask"),
            encoder_hidden_states=states,
            encoder_attention_mask=padding_mask(decoder.config, queries, mask, states),
            use_cache=False,
        ).last_hidden_state

    def logits(self, text: nn.Module, decoder_hidden: torch.Tensor) -> torch.Tensor:
        """LM head over final decoder states (as the library's forward applies it)."""
        return text.lm_head(decoder_hidden)


class MBartFamily(TextFamily):
    """MBart / BARTpho / mBART-50: pre-norm layers, a final encoder norm."""

    model_types = ("mbart",)
    layers_path = "model.encoder.layers"
    decoder_layers_path = "model.decoder.layers"
    cross_attention = "encoder_attn"
    speed_paths = frozenset(
        {PACKED_ENCODER, LEAN_DECODER, ABSORBED_CROSS_ATTENTION, HEAD_ON_LABELS}
    )

    def embed(self, text: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder(text)
        embeds = encoder.embed_tokens(input_ids)  # scaled embedding where the config asks
        hidden = embeds + encoder.embed_positions(embeds[..., -1]).to(embeds.device)
        return encoder.layernorm_embedding(hidden)

    def final_norm(self, text: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.encoder(text).layer_norm(hidden)

    def logits(self, text: nn.Module, decoder_hidden: torch.Tensor) -> torch.Tensor:
        return text.lm_head(decoder_hidden) + text.final_logits_bias


class BartFamily(MBartFamily):
    """BART: the MBart layout with post-norm layers and no final encoder norm (its layers are
    not packed: ``speed.packed`` follows the pre-norm order)."""

    model_types = ("bart",)
    speed_paths = frozenset({ABSORBED_CROSS_ATTENTION, HEAD_ON_LABELS})

    def final_norm(self, text: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class T5Family(TextFamily):
    """T5 / mT5 / ViT5: relative position bias computed by the first block and shared by all."""

    model_types = ("t5", "mt5")
    layers_path = "encoder.block"
    decoder_layers_path = "decoder.block"
    projections = ("q", "k", "v")

    def embed(self, text: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(text).embed_tokens(input_ids)

    def run_layers(self, text, layers, first, hidden, attention_mask):
        encoder = self.encoder(text)
        mask = padding_mask(encoder.config, hidden, attention_mask)
        position_bias = None
        if first > 0:  # the first block computes the bias; a suffix asks it directly
            length = hidden.shape[1]
            position_bias = (
                encoder.block[0]
                .layer[0]
                .SelfAttention.compute_bias(length, length, device=hidden.device)
            )
        for layer in layers:
            hidden, position_bias, _ = layer(hidden, mask, position_bias)
        return hidden

    def final_norm(self, text: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder(text)
        return encoder.dropout(encoder.final_layer_norm(hidden))

    def decoder_start_token_id(self, config) -> int:
        start = config.decoder_start_token_id
        return int(config.pad_token_id if start is None else start)

    def logits(self, text: nn.Module, decoder_hidden: torch.Tensor) -> torch.Tensor:
        if text.config.scale_decoder_outputs:
            decoder_hidden = decoder_hidden * (text.config.d_model**-0.5)
        return text.lm_head(decoder_hidden)


class VisionFamily:
    """A vision encoder family; ``splittable`` ones run their patch embeddings apart."""

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = "encoder.layer"
    projections: ClassVar[tuple[str, str, str]] = ("q_proj", "k_proj", "v_proj")
    splittable: ClassVar[bool] = False
    # What runs before the layers (frozen under last_n:N, trained under full only).
    before_layers: ClassVar[tuple[str, ...]] = ("embeddings",)
    # Parameters vqadapt never runs (masked-image token, pooler): never trained, so that the
    # plan counts only what can get a gradient.
    unused: ClassVar[tuple[str, ...]] = ()

    @property
    def name(self) -> str:
        return self.model_types[0]

    def embed(self, vision: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        raise VQAConfigError(f"the {self.name} vision tower does not run its embeddings apart")

    def encode_embeddings(self, vision: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
        raise VQAConfigError(f"the {self.name} vision tower does not run its embeddings apart")

    def encode(self, vision: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tokens (CLS + patches) from pixels."""
        if self.splittable:
            return self.encode_embeddings(vision, self.embed(vision, pixel_values))
        return vision(pixel_values=pixel_values).last_hidden_state


class Dinov2Family(VisionFamily):
    """DINOv2 (with or without registers): ``Dinov2Model.forward`` in two pieces."""

    model_types = ("dinov2", "dinov2_with_registers")
    splittable = True
    unused = ("embeddings.mask_token",)

    def embed(self, vision: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return vision.embeddings(pixel_values)

    def encode_embeddings(self, vision: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
        return vision.layernorm(vision.encoder(embeddings).last_hidden_state)


class ViTFamily(VisionFamily):
    model_types = ("vit",)
    layers_path = "layers"  # transformers 5 keeps ViT's layers at the top
    unused = ("embeddings.mask_token", "pooler.")


class ClipVisionFamily(VisionFamily):
    model_types = ("clip_vision_model", "siglip_vision_model")
    layers_path = "encoder.layers"
    before_layers = ("embeddings", "pre_layrnorm")


TEXT_FAMILIES: tuple[type[TextFamily], ...] = (MBartFamily, BartFamily, T5Family)
VISION_FAMILIES: tuple[type[VisionFamily], ...] = (Dinov2Family, ViTFamily, ClipVisionFamily)


def _lookup(model_type: str, families, what: str):
    for family in families:
        if model_type in family.model_types:
            return family()
    known = sorted(t for family in families for t in family.model_types)
    raise VQAConfigError(
        f"{what} model family {model_type!r} is not supported; use one of {', '.join(known)}"
    )


def text_family(model_or_type: nn.Module | str) -> TextFamily:
    """The family of a seq2seq text model (or of a ``model_type`` string)."""
    model_type = (
        model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    )
    return _lookup(model_type, TEXT_FAMILIES, "text")


def vision_family(model_or_type: nn.Module | str) -> VisionFamily:
    model_type = (
        model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    )
    return _lookup(model_type, VISION_FAMILIES, "vision")
