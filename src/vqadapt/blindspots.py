"""Blind spots for the tiny backbones: an attribute that reaches a tower's input, that none of
its frozen layers reads, and that its output does not carry.

The embedded benchmark's positive controls (``data.synth``) need towers that, frozen, can
hardly answer some questions while an adapted tower can. Training a tower to be *invariant* to
an attribute does not do it: tried with consistency losses (the same scene with other fills,
the same question with another colour), the attribute stayed linearly decodable from the
frozen features (probes: 99.7% and 94%). So the blind spot is built into the weights.

A few residual dimensions (``reserved_dims``) carry the attribute:

- the input embeddings put it there and nowhere else (the text model: a distinct code per
  blind word, those words being identical in every other dimension; DINOv2: colour-only patch
  filters (``chroma_filters``), its other filters seeing brightness and the red-cyan axis only,
  on which the benchmark's twin colours are the same); other tokens are zero there;
- no layer reads them: every layer's input projections (q, k, v, the first MLP layer) have
  zero columns there, so the frozen layers compute the same whatever the code (the codes sum
  to zero and have equal norms, so the layer norms' mean and variance barely depend on them);
- the final layer norm drops them (weight and bias 0 there, kept so): the frozen output does
  not carry the attribute at all.

An adapted tower can recover it: LoRA's A reads the codes in any layer and B writes them, through
the attention output, into dimensions the final norm passes; unfrozen layers read them through
their (trainable) zero columns. Measured (README, what the quick study measured): on the
benchmark's instructions (``data.synth``, the text shift) the frozen text encoder is far behind
every adapted one within the quick study, and on the twin colours (the vision shift) vision LoRA
beats the frozen tower (without dropout in the trainable parts; with the seed's 0.2 it stayed at
chance). ``keep_blind`` holds the structure while a tower is pretrained (gradients masked).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

RESERVED_DIMS = 8
"""How many residual dimensions carry the blind attribute (the last ones of the hidden size)."""
TEXT_CODE_NORM = 1.0
"""Norm of a blind word's code (the other tokens' embeddings start near 0.23)."""
CHROMA_SCALE = 2.0
"""Norm of a full colour's response in the colour-blind tower's reserved dimensions, as a
share of a typical patch embedding's norm."""


def reserved_dims(hidden: int, count: int = RESERVED_DIMS) -> list[int]:
    """The reserved dimensions: the last ``count`` of ``hidden``."""
    return list(range(hidden - count, hidden))


def position_codes(grid: int, dims: int, scale: float) -> torch.Tensor:
    """A code per patch of a ``grid`` x ``grid`` image (row-major), each summing to zero with
    norm ``scale``, smooth in the position: ``[u, -u]`` with ``u`` the cosine and sine of the
    column and of the row on a half circle (so that a linear read-out, as LoRA's, gives the
    column or row back, as from a real ViT's position embeddings)."""
    if dims % 8:
        raise ValueError(f"position codes need a multiple of 8 dimensions, got {dims}")
    angles = torch.arange(grid, dtype=torch.float32) * math.pi / grid
    rows, cols = torch.meshgrid(angles, angles, indexing="ij")
    parts = [cols.cos(), cols.sin(), rows.cos(), rows.sin()] * (dims // 8)
    half = torch.stack(parts, dim=-1).reshape(grid * grid, dims // 2)
    codes = torch.cat([half, -half], dim=1)
    return scale * codes / codes.norm(dim=1, keepdim=True)


def balanced_codes(count: int, dims: int, scale: float, seed: int = 0) -> torch.Tensor:
    """``count`` distinct codes of ``dims`` values, each summing to zero with norm ``scale``
    (so a layer norm's mean and variance do not tell them apart)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randn(count, dims, generator=generator)
    codes = codes - codes.mean(dim=1, keepdim=True)
    return scale * codes / codes.norm(dim=1, keepdim=True)


def _masks_for_layer(
    layer: nn.Module, dims: list[int], readers: Sequence[str], writers: Sequence[str]
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, keep-mask) pairs: zero input columns of ``readers``, zero output rows (and
    bias entries) of ``writers``."""
    out = []
    modules = dict(layer.named_modules())
    for name in readers:
        weight = modules[name].weight
        mask = torch.ones_like(weight)
        mask[:, dims] = 0
        out.append((weight, mask))
    for name in writers:
        module = modules[name]
        mask = torch.ones_like(module.weight)
        mask[dims, :] = 0
        out.append((module.weight, mask))
        if module.bias is not None:
            bias_mask = torch.ones_like(module.bias)
            bias_mask[dims] = 0
            out.append((module.bias, bias_mask))
    return out


def _final_norm(
    norm: nn.LayerNorm, dims: list[int]
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """The final layer norm drops the reserved dimensions (weight and bias 0 there); the masks
    keep them so while the rest of the norm trains."""
    out = []
    with torch.no_grad():
        norm.weight[dims] = 0.0
        norm.bias[dims] = 0.0
    for param in (norm.weight, norm.bias):
        mask = torch.ones_like(param)
        mask[dims] = 0
        out.append((param, mask))
    return out


def _apply(masks: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, mask in masks:
            param.mul_(mask)


def text_blind_spot(model, token_ids: Sequence[int], seed: int = 0) -> dict:
    """Make an MBart encoder blind to which of ``token_ids`` (the benchmark's blind words) a text
    holds.

    Returns what ``keep_blind`` needs: the parameter masks, and the frozen embedding rows.
    The rows of ``token_ids`` become one shared vector (their mean) outside the reserved
    dimensions and a distinct balanced code inside them.
    """
    encoder = model.get_encoder()
    hidden = model.config.d_model
    dims = reserved_dims(hidden)
    embedding = model.get_input_embeddings()
    masks = []
    # Every other token and the positions: zero in the reserved dimensions.
    token_mask = torch.ones_like(embedding.weight)
    token_mask[:, dims] = 0
    masks.append((embedding.weight, token_mask))
    position_mask = torch.ones_like(encoder.embed_positions.weight)
    position_mask[:, dims] = 0
    masks.append((encoder.embed_positions.weight, position_mask))
    for layer in encoder.layers:
        masks += _masks_for_layer(
            layer,
            dims,
            readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1"),
            writers=("self_attn.out_proj", "fc2"),
        )
    _apply(masks)
    masks += _final_norm(encoder.layer_norm, dims)
    ids = list(token_ids)
    with torch.no_grad():
        rows = embedding.weight[ids]
        # The codes dominate the blind tokens' vectors (a shared part of init scale, codes of
        # norm TEXT_CODE_NORM): after the embedding layer norm they carry most of the
        # token's energy, a strong signal for an adapted layer to pick up.
        scale = TEXT_CODE_NORM
        shared = rows.mean(dim=0)
        shared[dims] = 0
        codes = balanced_codes(len(ids), len(dims), scale, seed)
        for index, token in enumerate(ids):
            embedding.weight[token] = shared
            embedding.weight[token, dims] = codes[index]
        # The embedding layer norm passes the codes on (weight 1, bias 0 there).
        encoder.layernorm_embedding.weight[dims] = 1.0
        encoder.layernorm_embedding.bias[dims] = 0.0
    frozen_rows = torch.zeros_like(embedding.weight, dtype=torch.bool)
    frozen_rows[ids] = True
    return {
        "masks": masks,
        "frozen_rows": (embedding.weight, frozen_rows),
        "dims": dims,
        "frozen": [encoder.layernorm_embedding.weight, encoder.layernorm_embedding.bias],
    }


def chroma_filters(patch: int, std: Sequence[float], scale: float) -> torch.Tensor:
    """Eight patch filters (8, 3, patch, patch) that see only colour, not brightness: for the
    top and the bottom half of a patch, the two opponent-colour axes a = R - (G + B) / 2 and
    b = (G - B) * sqrt(3) / 2 of the raw pixels, and their negatives (so the eight responses
    sum to zero). For a palette of one luminance and one saturation (``data.synth``) the
    responses of a patch have the same norm whatever its colour, so layer norms cannot tell
    colours apart either. ``std``: the per-channel normalisation the tower's inputs get."""
    a = torch.tensor([1.0, -0.5, -0.5])
    b = torch.tensor([0.0, math.sqrt(3) / 2, -math.sqrt(3) / 2])
    scale_by_std = torch.tensor(list(std))  # undo the input normalisation: raw-pixel weights
    filters = []
    for half in (slice(0, patch // 2), slice(patch // 2, patch)):
        for axis in (a, b, -a, -b):
            weight = torch.zeros(3, patch, patch)
            weight[:, half, :] = (axis * scale_by_std)[:, None, None]
            filters.append(weight)
    stacked = torch.stack(filters)
    return scale * stacked / stacked[0].abs().sum()


SEEN_AXES = torch.tensor([[1.0, 1.0, 1.0], [2.0, -1.0, -1.0]])
"""What the colour-blind tower's usual patch filters see of a pixel (raw RGB): brightness and
the red-cyan opponent axis a, not the blue-yellow axis b (``data.synth.TWINS``)."""


def seen_part(weight: torch.Tensor, scale_by_std: torch.Tensor) -> torch.Tensor:
    """Patch filters (out, 3, p, p) restricted to ``SEEN_AXES`` in raw-pixel units (the
    inputs are normalised per channel by ``scale_by_std``)."""
    basis = SEEN_AXES / SEEN_AXES.norm(dim=1, keepdim=True)  # orthonormal rows
    raw = weight / scale_by_std
    coeff = torch.einsum("ocij,kc->okij", raw, basis)
    return torch.einsum("okij,kc->ocij", coeff, basis) * scale_by_std


def vision_blind_spot(
    model, mean_rgb: Sequence[float], std: Sequence[float], seed: int = 0
) -> dict:
    """Make a DINOv2 blind to the blue-yellow colour axis: the patch embedding's usual filters
    see only brightness and the red-cyan axis (``seen_part``), and the reserved dimensions get
    fixed colour-only filters (``chroma_filters``, both axes), which no layer reads."""
    hidden = model.config.hidden_size
    dims = reserved_dims(hidden)
    embeddings = model.embeddings
    projection = embeddings.patch_embeddings.projection
    patch = projection.weight.shape[-1]
    masks = []
    for token in (embeddings.cls_token, embeddings.mask_token):
        mask = torch.ones_like(token)
        mask[..., dims] = 0
        masks.append((token, mask))
    position_mask = torch.ones_like(embeddings.position_embeddings)
    position_mask[..., dims] = 0
    masks.append((embeddings.position_embeddings, position_mask))
    for layer in model.encoder.layer:
        masks += _masks_for_layer(
            layer,
            dims,
            readers=("attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1"),
            writers=("attention.o_proj", "mlp.fc2"),
        )
    _apply(masks)
    masks += _final_norm(model.layernorm, dims)
    scale_by_std = torch.tensor(list(std)).view(1, 3, 1, 1)
    with torch.no_grad():
        weight = projection.weight
        # brightness and the red-cyan axis only
        weight.copy_(seen_part(weight, scale_by_std))
        filters = chroma_filters(patch, std, 1.0)
        # Scaled so that a patch of full colour (saturation 120 of 255, as the palette) gives
        # colour responses of half a typical patch embedding's norm: a clear signal that
        # leaves most of the layer norms' variance to the brightness features.
        unit = torch.tensor([120.0, 0.0, 0.0]) / 255 / torch.tensor(list(std))  # one axis
        solid = torch.einsum("c,kcij->k", unit - unit.mean(), filters).norm().item()
        sample = torch.randn(
            4, 3, patch * 4, patch * 4, generator=torch.Generator().manual_seed(seed)
        )
        typical = embeddings.patch_embeddings(sample).norm(dim=-1).mean().item()
        weight[dims] = filters * (CHROMA_SCALE * typical / solid)
        # The inputs are normalised per channel; this bias cancels the means, so that a grey
        # pixel gives no colour response at all.
        mean = torch.tensor(list(mean_rgb)).view(1, 3, 1, 1)
        projection.bias[dims] = (weight[dims] * mean / scale_by_std).sum(dim=(1, 2, 3))
    return {
        "masks": masks,
        "dims": dims,
        "project": [(weight, projection.bias, dims, scale_by_std)],
    }


def project(spot: dict) -> None:
    """After an optimiser step: the usual filters back onto what they may see
    (``seen_part``), the colour filters and biases as they were (a linear constraint a
    gradient mask cannot express)."""
    with torch.no_grad():
        for weight, bias, dims, scale_by_std in spot.get("project", []):
            kept, kept_bias = spot.setdefault(
                "colour_filters", (weight[dims].clone(), bias[dims].clone())
            )
            weight.copy_(seen_part(weight, scale_by_std))
            weight[dims] = kept
            bias[dims] = kept_bias


@contextmanager
def keep_blind(spot: dict) -> Iterator[None]:
    """While pretraining: masked entries get no gradient (they stay zero: AdamW's update of a
    zero with zero gradient is zero), the codes and their carriers get none at all."""
    handles = []
    for param, mask in spot["masks"]:
        handles.append(param.register_hook(lambda grad, mask=mask: grad * mask))
    if "frozen_rows" in spot:
        weight, rows = spot["frozen_rows"]
        keep = (~rows).to(weight.dtype)
        handles.append(weight.register_hook(lambda grad, keep=keep: grad * keep))
    for param in spot.get("frozen", []):
        handles.append(param.register_hook(torch.zeros_like))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
