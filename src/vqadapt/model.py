"""VQAModel: vision -> projector -> text encoder + decoder ("no latent" fusion).

Towers, by parameter-name prefix: ``vision.`` (DINOv2-family encoder), ``projector.`` (vision
hidden size -> text d_model, plus a two-entry modality marker), ``text.`` (the seq2seq model:
its encoder under ``text.model.encoder.`` / ``text.encoder.``, the rest is the decoder side).

The decoder cross-attends to the concatenation [text-encoder states + marker(text) ;
projected image tokens (CLS + patches) + marker(image)]: no learned query tokens.

The text encoder runs in two pieces so that a frozen prefix can be cached:
``encode_text_prefix`` (embeddings + the first ``text_cache_layers`` layers, which never train)
and ``encode_text_suffix`` (the remaining layers + final norm). The uncached path calls both in
sequence, so cached and uncached runs compute the same function. Where each family keeps these
parts is in ``families.py``.

What this file computes is the library's function, with the library's modules. Faster ways to
compute the same (packed encoder, lean decoder, absorbed cross-attention, ...) are installed
onto a model by ``vqadapt.speed``, per device; a model built here alone runs the library path.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from vqadapt.backbones import (
    TowerLayout,
    decoder_layout,
    get_submodule,
    text_layout,
    vision_layout,
)
from vqadapt.errors import VQAConfigError
from vqadapt.families import TextFamily, VisionFamily, text_family, vision_family
from vqadapt.losses import token_losses
from vqadapt.speed import SpeedPaths


class Projector(nn.Module):
    """Vision hidden size -> text d_model (2-layer MLP), and the modality marker."""

    def __init__(self, vision_hidden: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(vision_hidden)
        self.fc1 = nn.Linear(vision_hidden, d_model)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.modality = nn.Embedding(2, d_model)  # 0: text token, 1: image token
        nn.init.normal_(self.modality.weight, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(self.norm(features)))))


def untie_decoder_embeddings(text: nn.Module) -> None:
    """Give the decoder (and LM head) their own copy of a shared input embedding.

    MBart/BART/T5 share one embedding between encoder, decoder and ``lm_head``. A decoder that
    trains fully (the default) would move the encoder's input embedding through a shared matrix
    and a "frozen" encoder would not be frozen. We copy it for the decoder side (decoder input
    embedding and LM head stay tied to each other) and leave the encoder's copy with the
    encoder. The decoder's copy (and the head tied to it) trains only with ``--text_decoder
    full``; the copy is made whatever the choice, so that checkpoints and exports have one
    layout.
    """
    encoder_embed = text.get_encoder().get_input_embeddings()
    decoder = text.get_decoder()
    decoder_embed = decoder.get_input_embeddings()
    if decoder_embed.weight is not encoder_embed.weight and (
        text.get_output_embeddings() is None
        or text.get_output_embeddings().weight is not encoder_embed.weight
    ):
        return
    new_embed = copy.deepcopy(decoder_embed)  # a fresh Parameter, same values
    decoder.set_input_embeddings(new_embed)
    head = text.get_output_embeddings()
    if head is not None and head.weight is encoder_embed.weight:
        head.weight = new_embed.weight
    text.config.tie_word_embeddings = False
    for module in text.modules():
        # transformers re-ties from these tables (save/load, tie_weights): forget them.
        if getattr(module, "_tied_weights_keys", None):
            module._tied_weights_keys = {}


def set_dropout(module: nn.Module, p: float) -> None:
    """Set the hidden-state dropout of a (decoder) module tree, leaving attention dropout alone."""
    for sub in module.modules():
        if "Attention" in type(sub).__name__:
            continue
        if isinstance(sub, nn.Dropout):
            sub.p = p
        elif isinstance(getattr(sub, "dropout", None), float):
            sub.dropout = p


class LibraryEncoder:
    """Text-encoder layers as the library runs them (padded batch, the family's mask)."""

    def __init__(self, family: TextFamily) -> None:
        self.family = family

    def run(
        self,
        text: nn.Module,
        layers: list[nn.Module],
        first: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        final_norm: bool,
    ) -> torch.Tensor:
        hidden = self.family.run_layers(text, layers, first, hidden, attention_mask)
        return self.family.final_norm(text, hidden) if final_norm else hidden


class TeacherForcing:
    """Per-sample losses of a teacher-forced pass as the library computes them: the decoder,
    the LM head over every position, the token cross-entropy where there is a label."""

    def __init__(self, family: TextFamily) -> None:
        self.family = family

    def losses(
        self,
        text: nn.Module,
        states: torch.Tensor,
        mask: torch.Tensor,
        batch: dict[str, torch.Tensor],
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        hidden = self.family.decoder_hidden(text, batch, states, mask)
        return token_losses(self.family.logits(text, hidden), batch["labels"], label_smoothing)


class VQAModel(nn.Module):
    """A vision tower feeding a seq2seq text model; ``vision`` is None for the blind baseline."""

    def __init__(self, vision: nn.Module | None, text: nn.Module, dropout: float = 0.1) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.text_family: TextFamily = text_family(text)
        self.vision_family: VisionFamily | None = (
            vision_family(vision) if vision is not None else None
        )
        self.text_layout: TowerLayout = text_layout(text)
        self.vision_layout: TowerLayout | None = (
            vision_layout(vision) if vision is not None else None
        )
        d_model = text.config.d_model
        self.projector = (
            Projector(vision.config.hidden_size, d_model, dropout) if vision is not None else None
        )
        untie_decoder_embeddings(text)
        set_dropout(text.get_decoder(), dropout)
        # Set by adapt.apply_adaptation: the leading text-encoder layers that never train (their
        # output can be cached), whether the vision tower (or its patch embeddings) train, and
        # the other modules with nothing trainable, which run in eval mode.
        self.text_cache_layers = 0
        self.vision_frozen = True
        self.vision_embeddings_frozen = True
        self.frozen_modules: list[nn.Module] = []
        self.rewritten_weights: list[str] = []  # frozen weights the LoRA init changed (PiSSA)
        # Towers whose layers recompute their activations in the backward pass.
        self.checkpointed: tuple[str, ...] = ()
        # How the pieces run: the library's way until vqadapt.speed installs faster ones.
        self.encoder_runner = LibraryEncoder(self.text_family)
        self.teacher_forcing = TeacherForcing(self.text_family)
        self.key_multiple = 1  # encoder states padded with masked keys to a multiple of this
        self.speed_paths = SpeedPaths.library()  # what vqadapt.speed.install put on

    # -- names ---------------------------------------------------------------------------
    @property
    def text_encoder(self) -> nn.Module:
        return self.text.get_encoder()

    @property
    def text_encoder_prefix(self) -> str:
        """Parameter-name prefix of the text encoder inside this model (e.g. ``text.model.encoder.``)."""
        root = self.text_layout.layers_path.rsplit(".", 1)[0]
        return f"text.{root}."

    def text_encoder_layers(self) -> nn.ModuleList:
        return get_submodule(self.text, self.text_layout.layers_path)

    def vision_layers(self) -> nn.ModuleList:
        assert self.vision is not None and self.vision_layout is not None
        return get_submodule(self.vision, self.vision_layout.layers_path)

    @property
    def decoder_layout(self) -> TowerLayout:
        return decoder_layout(self.text)

    def decoder_layers(self) -> nn.ModuleList:
        return get_submodule(self.text, self.text_family.decoder_layers_path)

    def tower_layers(self, tower: str) -> nn.ModuleList | None:
        """The layer stack of ``tower`` (None for the projector, or a blind model's vision)."""
        if tower == "vision":
            return self.vision_layers() if self.vision is not None else None
        if tower == "text_encoder":
            return self.text_encoder_layers()
        if tower == "text_decoder":
            return self.decoder_layers()
        return None

    def set_gradient_checkpointing(self, towers: tuple[str, ...]) -> None:
        """Recompute the activations of every layer of ``towers`` in the backward pass instead
        of keeping them (and stop doing so elsewhere).

        transformers' layers carry the switch (``GradientCheckpointingLayer``): the library's
        own loops check it, and so do vqadapt's speed paths (``speed.packed.run_layer``).
        Non-reentrant checkpointing with the RNG state preserved: the recomputed dropout masks
        are the ones of the forward pass, so the gradients are the same. As in transformers,
        only layers in training mode recompute: a layer with nothing trainable runs in eval
        mode and keeps its activations when the backward pass goes through it (a frozen
        decoder under a trained encoder; the plan's estimate counts it so).
        """
        from torch.utils.checkpoint import checkpoint
        from transformers.modeling_layers import GradientCheckpointingLayer

        recompute = functools.partial(checkpoint, use_reentrant=False)
        for tower in ("vision", "text_encoder", "text_decoder"):
            layers = self.tower_layers(tower)
            if layers is None:
                continue
            for layer in layers:
                if not isinstance(layer, GradientCheckpointingLayer):
                    raise VQAConfigError(
                        f"the {tower} layers ({type(layer).__name__}) do not support gradient "
                        "checkpointing"
                    )
                layer.gradient_checkpointing = tower in towers
                layer._gradient_checkpointing_func = recompute
        self.checkpointed = tuple(t for t in towers if self.tower_layers(t) is not None)

    @property
    def vision_splittable(self) -> bool:
        """Whether the vision tower's embeddings run apart from its layers (DINOv2)."""
        return self.vision_family is not None and self.vision_family.splittable

    def train(self, mode: bool = True) -> VQAModel:
        """Trainable parts follow ``mode``; frozen parts always run in eval mode (no dropout)."""
        super().train(mode)
        if self.vision is not None and self.vision_frozen:
            self.vision.eval()
        elif self.vision_splittable and self.vision_embeddings_frozen:
            self.vision.embeddings.eval()  # not trained: cached when the layers train
        if self.text_cache_layers == self.text_layout.num_layers:
            self.text_encoder.eval()  # all of it, embeddings and final dropout included (T5)
        for layer in list(self.text_encoder_layers())[: self.text_cache_layers]:
            layer.eval()
        for module in self.frozen_modules:  # a frozen decoder, projector, or layers of them
            module.eval()
        return self

    # -- text encoder in two pieces -------------------------------------------------------
    def encode_text_prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states after the embeddings and the frozen prefix (what the cache stores)."""
        hidden = self.text_family.embed(self.text, input_ids)
        layers = list(self.text_encoder_layers())[: self.text_cache_layers]
        final = self.text_cache_layers == self.text_layout.num_layers
        return self.encoder_runner.run(self.text, layers, 0, hidden, attention_mask, final)

    def encode_text_suffix(
        self, prefix: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The remaining layers and the final norm, from the prefix's states."""
        first = self.text_cache_layers
        if first == self.text_layout.num_layers:
            return prefix
        layers = list(self.text_encoder_layers())[first:]
        return self.encoder_runner.run(self.text, layers, first, prefix, attention_mask, True)

    # -- vision --------------------------------------------------------------------------
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings: trained only under ``--vision_encoder full``, so cached
        when the layers alone train (vision LoRA, last_n) and only the layers run each step."""
        assert self.vision_family is not None and self.vision_splittable
        return self.vision_family.embed(self.vision, pixel_values)

    def encode_image(
        self, pixel_values: torch.Tensor | None = None, embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Vision tokens (CLS + patches) before the projector (what the cache stores), from
        pixels or from cached embeddings."""
        assert self.vision is not None and self.vision_family is not None
        if embeddings is not None:
            return self.vision_family.encode_embeddings(self.vision, embeddings)
        return self.vision_family.encode(self.vision, pixel_values)

    # -- fusion --------------------------------------------------------------------------
    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states the decoder attends to, and their mask."""
        mask = batch["attention_mask"]
        prefix = batch.get("text_prefix")
        if prefix is None:
            prefix = self.encode_text_prefix(batch["input_ids"], mask)
        text_states = self.encode_text_suffix(prefix, mask)
        if self.vision is None:
            return text_states, mask
        features = batch.get("vision_features")
        if features is None:
            features = self.encode_image(
                batch.get("pixel_values"), embeddings=batch.get("vision_embeddings")
            )
        features = features.to(text_states.dtype)
        image_tokens = self.projector(features) + self.projector.modality.weight[1]
        text_states = text_states + self.projector.modality.weight[0]
        states = torch.cat([text_states, image_tokens], dim=1)
        image_mask = mask.new_ones(mask.shape[0], image_tokens.shape[1])
        return self._pad_keys(states, torch.cat([mask, image_mask], dim=1))

    def _pad_keys(
        self, states: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked zero states up to a multiple of ``key_multiple`` keys (the result is
        unchanged: masked keys get probability 0; vqadapt.speed says why it can be faster)."""
        extra = -states.shape[1] % self.key_multiple
        if not extra:
            return states, mask
        filler = states.new_zeros(states.shape[0], extra, states.shape[-1])
        pad = mask.new_zeros(mask.shape[0], extra)
        return torch.cat([states, filler], dim=1), torch.cat([mask, pad], dim=1)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        return_losses: bool = False,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Decoder logits (B, T, V) for teacher-forced ``decoder_input_ids``; with
        ``return_losses``, the per-sample mean token cross-entropy against ``labels`` (B,)."""
        states, mask = self.encode(batch)
        if return_losses:
            return self.teacher_forcing.losses(self.text, states, mask, batch, label_smoothing)
        return self.text(
            encoder_outputs=BaseModelOutput(last_hidden_state=states),
            attention_mask=mask,
            decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=batch.get("decoder_attention_mask"),
            use_cache=False,
        ).logits

    @torch.no_grad()
    def generate(
        self, batch: dict[str, torch.Tensor], max_new_tokens: int = 16, **kwargs
    ) -> torch.Tensor:
        states, mask = self.encode(batch)
        return self.text.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=states),
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            decoder_start_token_id=self.decoder_start_token_id,
            **kwargs,
        )

    @property
    def decoder_start_token_id(self) -> int:
        return self.text_family.decoder_start_token_id(self.text.config)
