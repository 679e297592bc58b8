"""The text encoder on real tokens only: no work is spent on padding.

Questions in a batch differ in length, and a padded (B, L) batch of the synthetic set is about a
third padding: every linear layer, norm and dropout of the encoder would run on those rows too.
Here the hidden states travel packed, (N, d) for the N real tokens, and only the attention
scores are formed on the padded grid (scattered there, masked, gathered back). Each layer is
the library's own modules (norms, projections, LoRA-wrapped or not, feed-forward) applied in
the library's order (``MBartEncoderLayer.forward``), so the states at real tokens equal the
library's up to float rounding (``tests/test_model.py``). Rows at padded positions come back as
zeros: nothing reads them (the decoder's cross-attention masks them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Dropout = Callable[..., torch.Tensor]  # (x, p, training) -> x, as F.dropout

# The attention grid's length is rounded up to a multiple of this (extra keys masked): CPU
# softmax and attention kernels take a slow path on rows whose length is not a multiple of the
# vector width (softmax over 15 keys measured 9x slower than over 16 here).
GRID_MULTIPLE = 16


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a right- or left-padded (B, L) batch sit."""

    index: torch.Tensor  # (N,) positions of the real tokens in the flattened (B * L) batch
    batch: int
    length: int
    grid_index: torch.Tensor  # (N,) their positions in the attention grid (B * grid_length)
    grid_length: int
    keys: torch.Tensor  # (B, 1, 1, grid_length) bool: True where a key is a real token

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        batch, length = attention_mask.shape
        real = attention_mask.bool()
        grid_length = -(-length // GRID_MULTIPLE) * GRID_MULTIPLE
        grid = F.pad(real, (0, grid_length - length))
        return cls(
            index=real.flatten().nonzero().squeeze(1),
            batch=batch,
            length=length,
            grid_index=grid.flatten().nonzero().squeeze(1),
            grid_length=grid_length,
            keys=grid.view(batch, 1, 1, grid_length),
        )

    def gather(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (N, ...)"""
        return padded.flatten(0, 1).index_select(0, self.index)

    def scatter(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, L, ...), zeros at padded positions."""
        grid = packed.new_zeros(self.batch * self.length, *packed.shape[1:])
        return grid.index_copy(0, self.index, packed).view(self.batch, self.length, -1)


def _vanilla_lora(module: nn.Module) -> str | None:
    """The adapter name of a peft LoRA ``Linear`` with one plain adapter, active and unmerged
    (no DoRA or other variant, no LoRA bias); None for anything else."""
    names = list(getattr(module, "lora_A", {}))
    if len(names) != 1 or type(getattr(module, "base_layer", None)) is not nn.Linear:
        return None
    name = names[0]
    plain = (
        not module.merged
        and not module.disable_adapters
        and list(module.active_adapters) == [name]
        and not module.lora_variant
        and module.lora_B[name].bias is None
    )
    return name if plain else None


def query_key_value(
    attention: nn.Module, hidden: torch.Tensor, dropout: Dropout = F.dropout
) -> torch.Tensor:
    """``q_proj``, ``k_proj`` and ``v_proj`` of ``hidden``, side by side (N, 3d), in as few
    kernels as possible.

    The three frozen or trainable base projections run as one (d -> 3d) matmul; with LoRA on
    all three, their A and B products run as two batched matmuls over the three, each on its
    own dropout mask of the input, as peft's three modules do. Anything else (a merged or
    DoRA adapter, other wrappers) runs module by module.
    """
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    if all(type(projection) is nn.Linear for projection in projections):
        bases, adapters = projections, None
    else:
        adapters = [_vanilla_lora(projection) for projection in projections]
        if None in adapters:
            return torch.cat([projection(hidden) for projection in projections], dim=-1)
        bases = [projection.base_layer for projection in projections]
    biases = [base.bias for base in bases]
    bias = None if biases[0] is None else torch.cat(biases)
    if (bias is None) != all(b is None for b in biases):
        return torch.cat([projection(hidden) for projection in projections], dim=-1)
    fused = F.linear(hidden, torch.cat([base.weight for base in bases]), bias)  # (N, 3d)
    if adapters is not None:
        loras = list(zip(projections, adapters, strict=True))
        drops = [p.lora_dropout[a] for p, a in loras]
        rates = {_dropout_rate(drop) for drop in drops}
        inputs = hidden.unsqueeze(0).expand(3, *hidden.shape)
        if len(rates) == 1:
            inputs = dropout(inputs, rates.pop(), drops[0].training)
        else:
            inputs = torch.stack([drop(hidden) for drop in drops])
        down = torch.stack([p.lora_A[a].weight for p, a in loras])
        up = torch.stack([p.lora_B[a].weight * p.scaling[a] for p, a in loras])
        delta = torch.bmm(torch.bmm(inputs, down.transpose(1, 2)), up.transpose(1, 2))
        fused = fused + delta.transpose(0, 1).reshape(fused.shape)
    return fused


def _dropout_rate(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def self_attention(
    attention: nn.Module, hidden: torch.Tensor, packing: Packing, dropout: Dropout = F.dropout
) -> torch.Tensor:
    """A BART-layout ``*Attention`` module on packed states (N, d) -> (N, d)."""
    heads, head_dim = attention.num_heads, attention.head_dim
    rows, length = packing.batch * packing.grid_length, packing.grid_length
    fused = query_key_value(attention, hidden, dropout)  # (N, 3d), scattered to the grid at once
    grid = fused.new_zeros(rows, fused.shape[-1]).index_copy(0, packing.grid_index, fused)
    grid = grid.view(packing.batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    query, key, value = grid.unbind(0)
    mixed = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=packing.keys,
        dropout_p=attention.dropout if attention.training else 0.0,
        scale=attention.scaling,
    )
    mixed = mixed.transpose(1, 2).reshape(rows, -1).index_select(0, packing.grid_index)
    return attention.out_proj(mixed)


def run_layer(function: Callable[..., Any], layer: nn.Module, *args: Any) -> Any:
    """``function(layer, *args)``, recomputed in the backward pass when ``layer`` asks for
    gradient checkpointing (the switch transformers' layers carry, which
    ``VQAModel.set_gradient_checkpointing`` sets), as the library's own call of the layer would
    be: the speed paths run a layer's modules themselves, not its ``forward``."""
    if (
        getattr(layer, "gradient_checkpointing", False)
        and layer.training
        and torch.is_grad_enabled()
    ):
        return layer._gradient_checkpointing_func(function, layer, *args)
    return function(layer, *args)


def encoder_layer(
    layer: nn.Module, hidden: torch.Tensor, packing: Packing, dropout: Dropout = F.dropout
) -> torch.Tensor:
    """``MBartEncoderLayer.forward`` (pre-norm; BART's post-norm layer is not packed) on packed
    states (N, d)."""
    residual = hidden
    hidden = self_attention(layer.self_attn, layer.self_attn_layer_norm(hidden), packing, dropout)
    hidden = residual + dropout(hidden, p=layer.dropout, training=layer.training)
    residual = hidden
    hidden = layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden)))
    hidden = dropout(hidden, p=layer.activation_dropout, training=layer.training)
    hidden = dropout(layer.fc2(hidden), p=layer.dropout, training=layer.training)
    hidden = residual + hidden
    if hidden.dtype == torch.float16:
        limit = torch.finfo(hidden.dtype).max - 1000
        hidden = hidden.clamp(min=-limit, max=limit)
    return hidden


class PackedEncoder:
    """Runs pre-norm (MBart-layout) encoder layers on the real tokens of a padded batch.

    Installed by ``vqadapt.speed`` in place of the family's library runner; takes and returns
    padded (B, L, d) states like it, with zeros at padded positions.
    """

    def __init__(self, family, dropout: Dropout = F.dropout) -> None:
        self.family = family
        self.dropout = dropout

    def run(
        self,
        text: nn.Module,
        layers: list[nn.Module],
        first: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        final_norm: bool,
    ) -> torch.Tensor:
        packing = Packing.of(attention_mask)
        hidden = packing.gather(hidden)
        for layer in layers:
            hidden = run_layer(encoder_layer, layer, hidden, packing, self.dropout)
        if final_norm:
            hidden = self.family.final_norm(text, hidden)
        return packing.scatter(hidden)
