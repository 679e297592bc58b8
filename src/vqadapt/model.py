"""VQAModel: vision -> projector -> text encoder + decoder ("no latent" fusion).

Towers, by parameter-name prefix: ``vision.`` (DINOv2-family encoder), ``projector.`` (vision
hidden size -> text d_model, plus a two-entry modality marker), ``text.`` (the seq2seq model:
its encoder under ``text.model.encoder.`` / ``text.encoder.``, the rest is the decoder side).

The decoder cross-attends to the concatenation [text-encoder states + marker(text) ;
projected image tokens (CLS + patches) + marker(image)]: no learned query tokens.

The text encoder runs in two pieces so that a frozen prefix can be cached:
``encode_text_prefix`` (embeddings + the first ``text_cache_layers`` layers, which never train)
and ``encode_text_suffix`` (the remaining layers + final norm). The uncached path calls both in
sequence, so cached and uncached runs compute the same function. For MBart both run on the
real tokens only (``packed.py``), with zeros at padded positions.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput

from vqadapt import cross_attention, decoder, packed
from vqadapt import dropout as fast_dropout
from vqadapt.backbones import TowerLayout, get_submodule, text_layout, vision_layout
from vqadapt.losses import token_losses

SPLITTABLE_TEXT_FAMILIES = ("mbart", "bart")
PACKED_TEXT_FAMILIES = ("mbart",)
SPLITTABLE_VISION = ("dinov2", "dinov2_with_registers")


class Projector(nn.Module):
    """Vision hidden size -> text d_model (2-layer MLP), and the modality marker."""

    def __init__(self, vision_hidden: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(vision_hidden)
        self.fc1 = nn.Linear(vision_hidden, d_model)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_model, d_model)
        self.dropout = fast_dropout.Dropout(dropout)
        self.modality = nn.Embedding(2, d_model)  # 0: text token, 1: image token
        nn.init.normal_(self.modality.weight, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(self.norm(features)))))


def untie_decoder_embeddings(text: nn.Module) -> None:
    """Give the decoder (and LM head) their own copy of a shared input embedding.

    MBart/BART/T5 share one embedding between encoder, decoder and ``lm_head``. The decoder
    trains fully, so a shared matrix would move the encoder's input embedding too and a "frozen"
    encoder would not be frozen. We copy it for the decoder side (decoder input embedding and
    LM head stay tied to each other) and leave the encoder's copy frozen.
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


class VQAModel(nn.Module):
    """A vision tower feeding a seq2seq text model; ``vision`` is None for the blind baseline."""

    def __init__(self, vision: nn.Module | None, text: nn.Module, dropout: float = 0.1) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
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
        cross_attention.install(text)  # same outputs, fewer FLOPs for short answers
        # Number of leading text-encoder layers that never train: set by adapt.apply_adaptation.
        self.text_cache_layers = 0
        self.vision_frozen = True

    # -- names ---------------------------------------------------------------------------
    @property
    def text_encoder(self) -> nn.Module:
        return self.text.get_encoder()

    @property
    def text_encoder_prefix(self) -> str:
        """Parameter-name prefix of the text encoder inside this model (e.g. ``text.model.encoder.``)."""
        root = self.text_layout.layers_path.rsplit(".", 1)[0]
        return f"text.{root}."

    @property
    def splittable(self) -> bool:
        return self.text_layout.family in SPLITTABLE_TEXT_FAMILIES

    @property
    def packed(self) -> bool:
        """Whether the text encoder runs on real tokens only (``packed.py``): MBart's pre-norm
        layers; BART's post-norm ones keep the padded library layers."""
        return self.text_layout.family in PACKED_TEXT_FAMILIES

    def text_encoder_layers(self) -> nn.ModuleList:
        return get_submodule(self.text, self.text_layout.layers_path)

    def vision_layers(self) -> nn.ModuleList:
        assert self.vision is not None and self.vision_layout is not None
        return get_submodule(self.vision, self.vision_layout.layers_path)

    def train(self, mode: bool = True) -> VQAModel:
        """Trainable parts follow ``mode``; frozen parts always run in eval mode (no dropout)."""
        super().train(mode)
        if self.vision is not None and self.vision_frozen:
            self.vision.eval()
        elif self.vision_splittable:
            self.vision.embeddings.eval()  # never trained (cached with vision LoRA)
        if self.text_cache_layers == self.text_layout.num_layers:
            self.text_encoder.eval()  # all of it, embeddings and final dropout included (T5)
        for layer in list(self.text_encoder_layers())[: self.text_cache_layers]:
            layer.eval()
        return self

    # -- text encoder in two pieces -------------------------------------------------------
    def _encoder_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return create_bidirectional_mask(
            config=self.text_encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
        )

    def encode_text_prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states after the frozen prefix (what the cache stores)."""
        encoder = self.text_encoder
        num_layers = self.text_layout.num_layers
        if not self.splittable:
            if self.text_cache_layers == num_layers:
                return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return input_ids  # suffix runs the whole encoder (no split for this family)
        embeds = encoder.embed_tokens(input_ids)
        hidden = embeds + encoder.embed_positions(embeds[:, :, -1]).to(embeds.device)
        # The embeddings never train: no dropout on them (frozen parts run in eval mode).
        hidden = encoder.layernorm_embedding(hidden)
        layers = list(encoder.layers)[: self.text_cache_layers]
        return self._encoder_layers(
            hidden, attention_mask, layers, final_norm=self.text_cache_layers == num_layers
        )

    def encode_text_suffix(
        self, prefix: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        encoder = self.text_encoder
        num_layers = self.text_layout.num_layers
        if self.text_cache_layers == num_layers:
            return prefix
        if not self.splittable:
            return encoder(input_ids=prefix, attention_mask=attention_mask).last_hidden_state
        layers = list(encoder.layers)[self.text_cache_layers :]
        return self._encoder_layers(prefix, attention_mask, layers, final_norm=True)

    def _encoder_layers(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        layers: list[nn.Module],
        final_norm: bool,
    ) -> torch.Tensor:
        """``layers`` (then the final norm if asked) on padded states (B, L, d). MBart's run on
        the real tokens only (``packed.py``) and come back with zeros at padded positions."""
        if self.packed:
            packing = packed.Packing.of(attention_mask)
            hidden = packing.gather(hidden)
            for layer in layers:
                hidden = packed.encoder_layer(layer, hidden, packing)
            return packing.scatter(self._final_norm(hidden) if final_norm else hidden)
        mask = self._encoder_mask(hidden, attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return self._final_norm(hidden) if final_norm else hidden

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = getattr(self.text_encoder, "layer_norm", None)
        return norm(hidden) if norm is not None else hidden

    # -- vision --------------------------------------------------------------------------
    @property
    def vision_splittable(self) -> bool:
        """Whether the vision tower's embeddings can run apart from its layers (DINOv2)."""
        return self.vision is not None and self.vision.config.model_type in SPLITTABLE_VISION

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings: never trained, so cached when the layers train (vision
        LoRA) and only the layers run each step."""
        assert self.vision_splittable
        return self.vision.embeddings(pixel_values)

    def encode_image(
        self, pixel_values: torch.Tensor | None = None, embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Vision tokens (CLS + patches) before the projector (what the cache stores), from
        pixels or from cached embeddings (``Dinov2Model.forward`` in two pieces)."""
        assert self.vision is not None
        if not self.vision_splittable:
            return self.vision(pixel_values=pixel_values).last_hidden_state
        if embeddings is None:
            embeddings = self.embed_image(pixel_values)
        return self.vision.layernorm(self.vision.encoder(embeddings).last_hidden_state)

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
        # Masked zero states round the key count up to a multiple of packed.GRID_MULTIPLE:
        # the decoder's cross-attention softmax then takes the CPU's fast path (its result is
        # unchanged: masked keys get probability 0).
        batch_size, count = mask.shape[0], text_states.shape[1] + image_tokens.shape[1]
        extra = -count % packed.GRID_MULTIPLE
        filler = text_states.new_zeros(batch_size, extra, text_states.shape[-1])
        states = torch.cat([text_states, image_tokens, filler], dim=1)
        image_mask = mask.new_ones(batch_size, image_tokens.shape[1])
        return states, torch.cat([mask, image_mask, mask.new_zeros(batch_size, extra)], dim=1)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        return_losses: bool = False,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Decoder logits (B, T, V) for teacher-forced ``decoder_input_ids``; with
        ``return_losses``, the per-sample mean token cross-entropy against ``labels`` (B,)."""
        states, mask = self.encode(batch)
        inputs = dict(
            encoder_outputs=BaseModelOutput(last_hidden_state=states),
            attention_mask=mask,
            decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=batch.get("decoder_attention_mask"),
            use_cache=False,
        )
        if not return_losses:
            return self.text(**inputs).logits
        labels = batch["labels"]
        if self.text.config.model_type not in SPLITTABLE_TEXT_FAMILIES:
            logits = self.text(**inputs).logits
            return token_losses(logits, labels, label_smoothing)
        # BART layout: the LM head only where there is a label (answers are short and padded
        # to the longest in the batch; the head's V x d matmul is the decoder's largest).
        text_decoder = self.text.get_decoder()
        if decoder.usable(text_decoder) and inputs["decoder_attention_mask"] is None:
            hidden = decoder.teacher_forced(text_decoder, inputs["decoder_input_ids"], states, mask)
        else:
            hidden = self.text.model(**inputs).last_hidden_state
        keep = labels != -100
        logits = self.text.lm_head(hidden[keep]) + self.text.final_logits_bias
        per_token = nn.functional.cross_entropy(
            logits.float(), labels[keep], label_smoothing=label_smoothing, reduction="none"
        )
        rows = keep.nonzero()[:, 0]
        sums = per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)
        return sums / keep.sum(dim=1).clamp(min=1)

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
        config = self.text.config
        start = config.decoder_start_token_id
        if start is None:
            start = (
                config.eos_token_id
                if config.model_type in ("mbart", "bart")
                else config.pad_token_id
            )
        return int(start)
