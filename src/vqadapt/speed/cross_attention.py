"""Decoder cross-attention without projecting the encoder states to keys and values.

The decoder writes short answers (a handful of tokens) while it attends to many encoder
states: 257 DINOv2-base patch tokens plus the question. The usual cross-attention projects
every state to a key and a value in every decoder layer, ``2 N d^2`` multiply-adds, and on a
frozen-encoder step that is most of the work. Associativity gives the same result from the
queries' side, since per head ``h`` (``X`` the encoder states, ``W_k,h`` its rows of ``k_proj``)::

    scores_h = q_h (X W_k,h^T + b_k,h)^T = (q_h W_k,h) X^T + q_h b_k,h
    out_h    = P_h (X W_v,h^T + b_v,h) = (P_h X) W_v,h^T + rowsum(P_h) b_v,h

which costs ``~2 H T N d`` (``T`` decoder tokens, ``H`` heads) instead of ``2 N d^2``:
cheaper whenever ``H T < d`` (tiny: 4 x 5 < 128; BARTpho: 16 x 8 < 1024). Exact up to float
rounding (``tests/test_cross_attention.py``). Used only for teacher-forced forwards (training,
validation loss); generation keeps the library's path, whose key / value cache is computed once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def absorbed_cost(heads: int, queries: int, keys: int, d_model: int, head_dim: int) -> int:
    return heads * queries * (2 * keys * d_model + 2 * head_dim * d_model)


def projected_cost(queries: int, keys: int, d_model: int) -> int:
    return 2 * keys * d_model * d_model + 2 * queries * keys * d_model


def _absorbed_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    key_value_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, queries, d_model = hidden_states.shape
    heads, head_dim = module.num_heads, module.head_dim
    rows = batch * queries
    # Per-head products as one batched matmul over the heads, (H, B*T, .) blocks: few large
    # matmuls rather than B*H tiny ones.
    query = module.q_proj(hidden_states).view(rows, heads, head_dim).transpose(0, 1)
    w_k = module.k_proj.weight.view(heads, head_dim, d_model)
    w_v = module.v_proj.weight.view(heads, head_dim, d_model)
    query_in_model_space = torch.bmm(query, w_k)  # (H, B*T, d)
    query_in_model_space = (
        query_in_model_space.view(heads, batch, queries, d_model)
        .transpose(0, 1)
        .reshape(batch, heads * queries, d_model)
    )
    scores = torch.bmm(query_in_model_space, key_value_states.transpose(1, 2))
    scores = scores.view(batch, heads, queries, -1)
    if module.k_proj.bias is not None:
        # The same for every key, so softmax ignores it; kept so that the bias gets its
        # (zero) gradient as in the library, which DDP expects of every trainable parameter.
        key_bias = torch.bmm(query, module.k_proj.bias.view(heads, head_dim, 1))  # (H, B*T, 1)
        scores = scores + key_bias.view(heads, batch, queries, 1).transpose(0, 1)
    scores = scores * module.scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    low_precision = scores.dtype in (torch.float16, torch.bfloat16)
    probs = F.softmax(scores.float() if low_precision else scores, dim=-1).to(scores.dtype)
    probs = F.dropout(probs, p=module.dropout, training=module.training)
    mixed = torch.bmm(probs.view(batch, heads * queries, -1), key_value_states)  # (B, H*T, d)
    mixed = mixed.view(batch, heads, queries, d_model).transpose(0, 1).reshape(heads, rows, -1)
    out = torch.bmm(mixed, w_v.transpose(1, 2))  # (H, B*T, dh)
    if module.v_proj.bias is not None:
        # Rows of P sum to 1, except where dropout zeroed some: keep the exact sum.
        mass = probs.sum(-1).permute(1, 0, 2).reshape(heads, rows, 1)
        out = out + mass * module.v_proj.bias.view(heads, 1, head_dim)
    out = out.transpose(0, 1).reshape(batch, queries, d_model)
    return module.out_proj(out), probs


class AbsorbedCrossAttention:
    """Mixed into a library cross-attention class (``install``): teacher-forced calls take the
    absorbed path where it is cheaper; every other call (generation with its key / value cache,
    LoRA-wrapped key or value projections) the library's ``forward``."""

    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, **kw):
        usable = (
            key_value_states is not None
            and cache is None
            and kw.get("past_key_values") is None
            and type(self.k_proj) is nn.Linear  # a LoRA-wrapped projection keeps the library path
            and type(self.v_proj) is nn.Linear
        )
        if usable:
            queries, keys = hidden_states.shape[1], key_value_states.shape[1]
            d_model = hidden_states.shape[-1]
            cheaper = absorbed_cost(
                self.num_heads, queries, keys, d_model, self.head_dim
            ) < projected_cost(queries, keys, d_model)
            if cheaper:
                return _absorbed_forward(self, hidden_states, key_value_states, attention_mask)
        return super().forward(
            hidden_states,
            key_value_states=key_value_states,
            cache=cache,
            attention_mask=attention_mask,
            **kw,
        )


_ABSORBED_CLASSES: dict[type, type] = {}


def _absorbed_class(library_class: type) -> type:
    """``AbsorbedCrossAttention`` over ``library_class`` (one subclass per library class)."""
    if library_class not in _ABSORBED_CLASSES:
        name = f"Absorbed{library_class.__name__}"
        _ABSORBED_CLASSES[library_class] = type(name, (AbsorbedCrossAttention, library_class), {})
    return _ABSORBED_CLASSES[library_class]


def install(text_model: nn.Module, attribute: str, enabled: bool = True) -> int:
    """Give every decoder cross-attention (``layer.<attribute>``) the absorbed path, or with
    ``enabled`` False take it away; returns how many modules changed. The module keeps its
    parameters and names: only its class becomes the subclass (or the library class again)."""
    changed = 0
    for layer in text_model.get_decoder().layers:
        module = getattr(layer, attribute)
        absorbed = isinstance(module, AbsorbedCrossAttention)
        if enabled and not absorbed:
            module.__class__ = _absorbed_class(type(module))
        elif not enabled and absorbed:
            module.__class__ = type(module).__mro__[2]  # (subclass, mixin, library class)
        else:
            continue
        changed += 1
    return changed
