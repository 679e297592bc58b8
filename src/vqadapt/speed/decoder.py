"""The MBart decoder for teacher-forced passes (training, validation loss), without the library's
per-call machinery.

``MBartDecoder.forward`` builds a key / value cache object, causal and cross-attention masks
and output records on every call; a teacher-forced pass needs none of them (no cache, a causal
self-attention, one padding mask over the encoder states). This runs the same modules in the
library's order (``MBartDecoder.forward`` / ``MBartDecoderLayer.forward``): token and position
embeddings, then per layer causal self-attention, cross-attention (the absorbed path of
``cross_attention.py``) and the feed-forward block, with the installed dropout.
Hidden states equal the library's up to float rounding (``tests/test_packed.py``). Generation
keeps the library's decoder and its key / value cache.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vqadapt.losses import token_losses
from vqadapt.speed.packed import Dropout, run_layer


def _causal_self_attention(attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    batch, length, _ = hidden.shape
    shape = (batch, length, attention.num_heads, attention.head_dim)
    query, key, value = (
        proj(hidden).view(shape).transpose(1, 2)
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    mixed = F.scaled_dot_product_attention(
        query,
        key,
        value,
        is_causal=True,
        dropout_p=attention.dropout if attention.training else 0.0,
        scale=attention.scaling,
    )
    return attention.out_proj(mixed.transpose(1, 2).reshape(batch, length, -1))


def decoder_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    states: torch.Tensor,
    keys: torch.Tensor,
    dropout: Dropout = F.dropout,
) -> torch.Tensor:
    """``MBartDecoderLayer.forward`` for a teacher-forced pass: causal self-attention,
    cross-attention to ``states`` where ``keys`` (B, 1, 1, N) is True, feed-forward."""
    drop = layer.dropout if layer.training else 0.0
    residual = hidden
    hidden = _causal_self_attention(layer.self_attn, layer.self_attn_layer_norm(hidden))
    hidden = residual + dropout(hidden, drop)
    residual = hidden
    hidden, _ = layer.encoder_attn(
        hidden_states=layer.encoder_attn_layer_norm(hidden),
        key_value_states=states,
        attention_mask=keys,
    )
    hidden = residual + dropout(hidden, drop)
    residual = hidden
    hidden = layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden)))
    hidden = dropout(hidden, layer.activation_dropout if layer.training else 0.0)
    return residual + dropout(layer.fc2(hidden), drop)


def teacher_forced(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    states: torch.Tensor,
    states_mask: torch.Tensor,
    dropout: Dropout = F.dropout,
) -> torch.Tensor:
    """Final decoder hidden states (B, T, d) for ``input_ids`` (B, T) attending to ``states``
    (B, N, d) where ``states_mask`` (B, N) is 1."""
    embeds = decoder.embed_tokens(input_ids)
    hidden = embeds + decoder.embed_positions(input_ids, 0).to(embeds.device)
    hidden = decoder.layernorm_embedding(hidden)
    hidden = dropout(hidden, decoder.dropout, decoder.training)
    keys = states_mask.bool()[:, None, None, :]
    for layer in decoder.layers:
        hidden = run_layer(decoder_layer, layer, hidden, states, keys, dropout)
    return decoder.layer_norm(hidden)


class FastTeacherForcing:
    """Per-sample losses of a teacher-forced pass, with the speed paths a family supports:
    the lean decoder (MBart, no LayerDrop in training) and the LM head on labelled positions
    only (boolean indexing: a host sync, so CPU only). Stands in for the model's library
    ``TeacherForcing`` (``vqadapt.model``), whose results it equals up to float rounding."""

    def __init__(self, family, lean_decoder: bool, head_on_labels: bool, dropout=F.dropout):
        self.family = family
        self.lean_decoder = lean_decoder
        self.head_on_labels = head_on_labels
        self.dropout = dropout

    def losses(
        self,
        text: nn.Module,
        states: torch.Tensor,
        mask: torch.Tensor,
        batch: dict[str, torch.Tensor],
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        decoder = text.get_decoder()
        lean = (
            self.lean_decoder
            and batch.get("decoder_attention_mask") is None
            and not (decoder.training and decoder.layerdrop > 0)  # LayerDrop skips layers
        )
        if lean:
            hidden = teacher_forced(decoder, batch["decoder_input_ids"], states, mask, self.dropout)
        else:
            hidden = self.family.decoder_hidden(text, batch, states, mask)
        labels = batch["labels"]
        if not self.head_on_labels:
            return token_losses(self.family.logits(text, hidden), labels, label_smoothing)
        # Answers are short and padded to the longest in the batch; the head's V x d matmul is
        # the decoder's largest, so it runs where there is a label only.
        keep = labels != -100
        logits = self.family.logits(text, hidden[keep])
        per_token = F.cross_entropy(
            logits.float(), labels[keep], label_smoothing=label_smoothing, reduction="none"
        )
        rows = keep.nonzero()[:, 0]
        sums = per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)
        return sums / keep.sum(dim=1).clamp(min=1)
