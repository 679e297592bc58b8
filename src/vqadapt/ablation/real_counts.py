"""Exact trainable-parameter counts of each strategy at the real backbones' shapes.

The tiny study's counts say nothing about BARTpho-syllable + DINOv2-base, and a rounded
figure from memory is easily off by 2x. Here the real shapes are built from their configs on
PyTorch's ``meta`` device (no weights, no download, a few seconds), assembled into a
``VQAModel`` and adapted by ``adapt.apply_adaptation``, the same function every run uses, so
the counts are exactly what a real run would report in its plan.
"""

from __future__ import annotations

from typing import Any

BARTPHO_SYLLABLE = dict(
    vocab_size=40_030,
    d_model=1024,
    encoder_layers=12,
    decoder_layers=12,
    encoder_attention_heads=16,
    decoder_attention_heads=16,
    encoder_ffn_dim=4096,
    decoder_ffn_dim=4096,
    max_position_embeddings=1024,
    scale_embedding=False,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_eos_token_id=2,
)
"""vinai/bartpho-syllable's config.json (an MBart), the fields that decide parameter counts."""

DINOV2_BASE = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    mlp_ratio=4,
    image_size=518,
    patch_size=14,
    layerscale_value=1.0,
)
"""facebook/dinov2-base's config.json, the fields that decide parameter counts."""

REAL_SHAPES = "BARTpho-syllable (MBart, d_model 1024, 12+12 layers, FFN 4096, vocab 40,030) + DINOv2-base (hidden 768, 12 layers)"


def _meta_model(blind: bool = False):
    import torch
    from transformers import Dinov2Config, Dinov2Model, MBartConfig, MBartForConditionalGeneration

    from vqadapt.model import VQAModel

    with torch.device("meta"):
        text = MBartForConditionalGeneration(MBartConfig(**BARTPHO_SYLLABLE))
        vision = None if blind else Dinov2Model(Dinov2Config(**DINOV2_BASE))
        return VQAModel(vision, text, dropout=0.0)


def real_shape_counts(experiments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each ``{"name", "overrides"}`` (a study's experiments): the trainable parameters
    of the adapted encoders (text encoder + vision tower), of everything that trains
    (adapted encoders + decoder side + projector) and the model's total, at the real shapes.

    Overrides other than the adaptation settings are ignored (they change no count).
    """
    import torch

    from vqadapt.adapt import apply_adaptation
    from vqadapt.config import AdaptConfig

    fields = set(AdaptConfig.__dataclass_fields__)
    rows = []
    for experiment in experiments:
        overrides = experiment.get("overrides") or {}
        adapt = AdaptConfig(**{k: v for k, v in overrides.items() if k in fields})
        blind = bool(overrides.get("blind", False))
        with torch.device("meta"):
            model = _meta_model(blind)
            plan = apply_adaptation(model, adapt, blind=blind)
        towers = plan.per_tower
        rows.append(
            {
                "experiment": experiment["name"],
                "strategy": plan.strategy,
                "adapted_encoder_params": towers["text_encoder"]["trainable"]
                + towers["vision"]["trainable"],
                "text_encoder_params": towers["text_encoder"]["trainable"],
                "vision_params": towers["vision"]["trainable"],
                "trainable_params": plan.trainable,
                "total_params": plan.total,
            }
        )
    return rows
