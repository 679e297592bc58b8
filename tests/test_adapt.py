"""What trains: ``adapt.apply_adaptation`` against parameter counts computed by hand.

Every expected number below is arithmetic on the tiny configs (d_model, FFN width, vocabulary,
layer counts), cross-checked once against freshly built transformers modules; none is read
back from the code under test.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from vqadapt.adapt import (
    apply_adaptation,
    coverage_text,
    format_plan,
    lora_parameter_count,
)
from vqadapt.backbones import resolve_targets
from vqadapt.config import AdaptConfig, RunConfig, TrainConfig
from vqadapt.errors import VQAConfigError
from vqadapt.model import VQAModel


# -- arithmetic ------------------------------------------------------------------------------
def linear(d_in: int, d_out: int, bias: bool = True) -> int:
    return d_in * d_out + (d_out if bias else 0)


def mbart_encoder_layer(d: int, ffn: int) -> int:
    """q, k, v, out projections; two layer norms; fc1, fc2."""
    return 4 * linear(d, d) + 2 * (2 * d) + linear(d, ffn) + linear(ffn, d)


def mbart_decoder_layer(d: int, ffn: int) -> int:
    """Self- and cross-attention (4 projections each); three layer norms; fc1, fc2."""
    return 8 * linear(d, d) + 3 * (2 * d) + linear(d, ffn) + linear(ffn, d)


def mbart_stack(vocab: int, d: int, max_positions: int, layers: int, per_layer: int) -> int:
    """Token embedding + learned positions (offset 2) + embedding norm + layers + final norm."""
    return vocab * d + (max_positions + 2) * d + 2 * d + layers * per_layer + 2 * d


def projector(vision_d: int, d: int) -> int:
    """LayerNorm(vision) -> fc1 -> fc2, plus the two-entry modality embedding."""
    return 2 * vision_d + linear(vision_d, d) + linear(d, d) + 2 * d


def lora_qkv(layers: int, r: int, d_in: int, d_out: int, projections: int = 3) -> int:
    """A (r x d_in) and B (d_out x r) on each projection of each layer."""
    return layers * projections * r * (d_in + d_out)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Expected:
    """Independent counts for the tiny MBart + DINOv2 model."""

    vision: int
    vision_layer: int
    projector: int
    encoder: int  # including its input embedding
    encoder_layer: int
    decoder_side: int  # decoder, its untied embedding copy (= lm_head)
    layers: int
    vision_layers: int
    d: int
    vision_d: int


def expected_counts(model: VQAModel) -> Expected:
    from transformers import Dinov2Model

    c = model.text.config
    d = c.d_model
    encoder_layer = mbart_encoder_layer(d, c.encoder_ffn_dim)
    fresh_vision = Dinov2Model(model.vision.config)
    return Expected(
        vision=n_params(fresh_vision),
        vision_layer=n_params(fresh_vision.encoder.layer[0]),
        projector=projector(model.vision.config.hidden_size, d),
        encoder=mbart_stack(
            c.vocab_size, d, c.max_position_embeddings, c.encoder_layers, encoder_layer
        ),
        encoder_layer=encoder_layer,
        decoder_side=mbart_stack(
            c.vocab_size,
            d,
            c.max_position_embeddings,
            c.decoder_layers,
            mbart_decoder_layer(d, c.decoder_ffn_dim),
        ),
        layers=c.encoder_layers,
        vision_layers=model.vision.config.num_hidden_layers,
        d=d,
        vision_d=model.vision.config.hidden_size,
    )


STRATEGIES = {
    "frozen": AdaptConfig(),
    "unfreeze3": AdaptConfig(unfreeze_encoder_layers=3),
    "text_lora8": AdaptConfig(use_text_lora=True, text_lora_r=8),
    "vision_lora4": AdaptConfig(use_vision_lora=True, vision_lora_r=4),
    "both_lora": AdaptConfig(
        use_text_lora=True, text_lora_r=4, use_vision_lora=True, vision_lora_r=2
    ),
    "text_lora4_unfreeze3": AdaptConfig(
        use_text_lora=True, text_lora_r=4, unfreeze_encoder_layers=3
    ),
}
COVERAGE = {
    "frozen": "none (frozen)",
    "unfreeze3": "layers 10-12 only (25% of encoder)",
    "text_lora8": "all 12 layers (LoRA)",
    "vision_lora4": "none (frozen)",
    "both_lora": "all 12 layers (LoRA)",
    "text_lora4_unfreeze3": "all 12 layers (LoRA)",
}
TEXT_MODES = {
    "frozen": ["frozen"] * 12,
    "unfreeze3": ["frozen"] * 9 + ["full"] * 3,
    "text_lora8": ["lora"] * 12,
    "vision_lora4": ["frozen"] * 12,
    "both_lora": ["lora"] * 12,
    "text_lora4_unfreeze3": ["lora"] * 9 + ["full+lora"] * 3,
}


def test_the_arithmetic_matches_fresh_transformers_modules(make_tiny_model) -> None:
    """The hand formulas are right (else every count test below would test nothing)."""
    from transformers import MBartForConditionalGeneration
    from transformers.models.mbart.modeling_mbart import MBartDecoderLayer, MBartEncoderLayer

    model = make_tiny_model()
    c = model.text.config
    expected = expected_counts(model)
    assert n_params(MBartEncoderLayer(c)) == expected.encoder_layer
    assert n_params(MBartDecoderLayer(c)) == mbart_decoder_layer(c.d_model, c.decoder_ffn_dim)
    tied = copy.deepcopy(c)
    tied.tie_word_embeddings = True  # VQAModel unties the config it was given
    fresh = MBartForConditionalGeneration(tied)
    assert fresh.lm_head.weight is fresh.get_encoder().get_input_embeddings().weight
    assert n_params(fresh.get_encoder()) == expected.encoder
    # The shared (tied) model counts the embedding once; the VQA model holds a decoder copy:
    # decoder side = all text parameters - encoder parameters + the untied embedding.
    assert n_params(fresh) - expected.encoder + c.vocab_size * c.d_model == expected.decoder_side
    assert n_params(model.projector) == expected.projector
    assert n_params(model) == (
        expected.vision + expected.projector + expected.encoder + expected.decoder_side
    )


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_trainable_counts_per_strategy(make_tiny_model, name: str) -> None:
    adapt = STRATEGIES[name]
    model = make_tiny_model()
    e = expected_counts(model)
    plan = apply_adaptation(model, adapt)

    text_lora = lora_qkv(e.layers, adapt.text_lora_r, e.d, e.d) if adapt.use_text_lora else 0
    vision_lora = (
        lora_qkv(e.vision_layers, adapt.vision_lora_r, e.vision_d, e.vision_d)
        if adapt.use_vision_lora
        else 0
    )
    unfreeze = adapt.unfreeze_encoder_layers
    unfrozen = unfreeze * e.encoder_layer + (2 * e.d if unfreeze else 0)  # + final norm

    assert plan.per_tower["vision"] == {"trainable": vision_lora, "total": e.vision + vision_lora}
    assert plan.per_tower["projector"] == {"trainable": e.projector, "total": e.projector}
    assert plan.per_tower["text_encoder"]["trainable"] == text_lora + unfrozen
    assert (
        plan.total == e.vision + e.projector + e.encoder + e.decoder_side + text_lora + vision_lora
    )
    assert plan.total == sum(p.numel() for p in model.parameters())
    assert plan.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.trainable == sum(t["trainable"] for t in plan.per_tower.values())

    text_rows = [row for row in plan.layers if row.tower == "text_encoder"]
    vision_rows = [row for row in plan.layers if row.tower == "vision"]
    assert [row.layer for row in text_rows] == list(range(1, 13))
    assert [row.mode for row in text_rows] == TEXT_MODES[name]
    text_lora_per_layer = text_lora // e.layers
    for row in text_rows:
        assert row.total == e.encoder_layer + text_lora_per_layer
        full = row.mode in ("full", "full+lora")
        assert row.trainable == (row.total if full else text_lora_per_layer)
    vision_lora_per_layer = vision_lora // e.vision_layers
    assert [row.mode for row in vision_rows] == (
        ["lora" if adapt.use_vision_lora else "frozen"] * e.vision_layers
    )
    for row in vision_rows:
        assert (row.trainable, row.total) == (
            vision_lora_per_layer,
            e.vision_layer + vision_lora_per_layer,
        )

    assert plan.coverage == COVERAGE[name]
    adapted = [i + 1 for i, mode in enumerate(TEXT_MODES[name]) if mode != "frozen"]
    assert plan.text_encoder_layers_adapted == adapted
    assert plan.text_encoder_layers_total == 12
    assert plan.text_cache_layers == (0 if adapt.use_text_lora else 12 - unfreeze)
    assert plan.vision_frozen is not adapt.use_vision_lora
    assert f"text-encoder coverage: {COVERAGE[name]}" in format_plan(plan)


def test_encoder_input_embedding_is_frozen_and_counted_in_the_text_encoder(
    make_tiny_model,
) -> None:
    for family in ("mbart", "t5"):
        model = make_tiny_model(family)
        apply_adaptation(model, AdaptConfig())
        embedding = model.text_encoder.get_input_embeddings().weight
        assert not embedding.requires_grad, f"{family}: the frozen encoder's embedding trains"
    for adapt in STRATEGIES.values():
        model = make_tiny_model()
        e = expected_counts(model)
        plan = apply_adaptation(model, adapt)
        text_lora = lora_qkv(e.layers, adapt.text_lora_r, e.d, e.d) if adapt.use_text_lora else 0
        assert plan.per_tower["text_encoder"]["total"] == e.encoder + text_lora
        assert plan.per_tower["text_decoder"] == {
            "trainable": e.decoder_side,
            "total": e.decoder_side,
        }


TEXT_LORA_NAME = re.compile(
    r"text\.model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)"
    r"\.lora_[AB]\.default\.weight"
)
VISION_LORA_NAME = re.compile(
    r"vision\.encoder\.layer\.(\d+)\.attention\.(q_proj|k_proj|v_proj)\.lora_[AB]\.default\.weight"
)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_lora_only_where_asked(make_tiny_model, name: str) -> None:
    adapt = STRATEGIES[name]
    model = make_tiny_model()
    plan = apply_adaptation(model, adapt)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    text = [n for n in lora if TEXT_LORA_NAME.fullmatch(n)]
    vision = [n for n in lora if VISION_LORA_NAME.fullmatch(n)]
    assert sorted(text + vision) == sorted(lora), "LoRA outside encoder attention q/k/v"
    assert len(text) == (12 * 3 * 2 if adapt.use_text_lora else 0)
    assert len(vision) == (2 * 3 * 2 if adapt.use_vision_lora else 0)
    assert {int(TEXT_LORA_NAME.fullmatch(n)[1]) for n in text} == (
        set(range(12)) if adapt.use_text_lora else set()
    )
    assert not [n for n in lora if "decoder" in n]
    assert len(plan.lora_modules["text_encoder"]) == (36 if adapt.use_text_lora else 0)
    assert len(plan.lora_modules["vision"]) == (6 if adapt.use_vision_lora else 0)
    # The wrapped base projections keep the layer's own mode: frozen unless unfrozen.
    first_unfrozen = 12 - adapt.unfreeze_encoder_layers
    for n, p in model.named_parameters():
        match = re.fullmatch(r"text\.model\.encoder\.layers\.(\d+)\..*base_layer\.weight", n)
        if match:
            assert p.requires_grad == (int(match[1]) >= first_unfrozen), n
        if n.startswith("vision.") and ".lora_" not in n:
            assert not p.requires_grad, n


def test_chosen_targets_only(make_tiny_model) -> None:
    model = make_tiny_model()
    adapt = AdaptConfig(use_text_lora=True, text_lora_r=4, text_lora_targets="q_proj, v_proj")
    plan = apply_adaptation(model, adapt)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert {n.split(".")[6] for n in lora} == {"q_proj", "v_proj"}
    assert plan.per_tower["text_encoder"]["trainable"] == lora_qkv(12, 4, 16, 16, projections=2)


def test_unfreeze_trains_last_layers_and_final_norm_only(make_tiny_model) -> None:
    model = make_tiny_model()
    apply_adaptation(model, AdaptConfig(unfreeze_encoder_layers=3))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder = {n for n in trainable if n.startswith("text.model.encoder.")}
    layers = {int(n.split(".")[4]) for n in encoder if n.startswith("text.model.encoder.layers.")}
    assert layers == {9, 10, 11}
    assert encoder - {n for n in encoder if ".layers." in n} == {
        "text.model.encoder.layer_norm.weight",
        "text.model.encoder.layer_norm.bias",
    }
    assert all(n.startswith(("projector.", "text.")) for n in trainable)
    assert {n for n in trainable if n.startswith("text.model.decoder.")} == {
        n for n, _ in model.named_parameters() if n.startswith("text.model.decoder.")
    }


def test_coverage_text() -> None:
    assert coverage_text([], 12, False) == "none (frozen)"
    assert coverage_text([10, 11, 12], 12, False) == "layers 10-12 only (25% of encoder)"
    assert coverage_text([12], 12, False) == "layers 12 only (8% of encoder)"
    assert coverage_text(list(range(1, 13)), 12, False) == "all 12 layers"
    assert coverage_text(list(range(1, 13)), 12, True) == "all 12 layers (LoRA)"


def test_unfreeze_all_layers(make_tiny_model) -> None:
    model = make_tiny_model()
    e = expected_counts(model)
    plan = apply_adaptation(model, AdaptConfig(unfreeze_encoder_layers=12))
    assert plan.coverage == "all 12 layers"
    assert plan.text_cache_layers == 0
    assert plan.per_tower["text_encoder"]["trainable"] == 12 * e.encoder_layer + 2 * e.d


# -- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [13, 100, -1])
def test_unfreeze_out_of_range(make_tiny_model, layers: int) -> None:
    model = make_tiny_model()
    adapt = AdaptConfig()
    adapt.unfreeze_encoder_layers = layers  # -1 is refused at construction; adapt checks too
    with pytest.raises(VQAConfigError, match=rf"--unfreeze_encoder_layers {layers} .*12 layers"):
        apply_adaptation(model, adapt)
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]


@pytest.mark.parametrize(
    ("adapt", "message"),
    [
        ({"unfreeze_encoder_layers": -1}, "unfreeze_encoder_layers must be >= 0"),
        ({"use_text_lora": True, "text_lora_r": 0}, "--text_lora_r must be > 0 (got 0)"),
        ({"use_text_lora": True, "text_lora_r": -4}, "--text_lora_r must be > 0 (got -4)"),
        ({"use_vision_lora": True, "vision_lora_r": 0}, "--vision_lora_r must be > 0"),
        ({"use_text_lora": True, "text_lora_alpha": 0}, "--text_lora_alpha must be > 0 (got 0)"),
        (
            {"use_vision_lora": True, "vision_lora_alpha": -1},
            "--vision_lora_alpha must be > 0 (got -1)",
        ),
        (
            {"use_text_lora": True, "text_lora_dropout": 1.0},
            "--text_lora_dropout must be in [0, 1)",
        ),
    ],
)
def test_invalid_adaptation_settings(adapt: dict, message: str) -> None:
    # refused at construction (the config is valid once it exists)
    with pytest.raises(VQAConfigError, match=re.escape(message)):
        RunConfig(adapt=AdaptConfig(**adapt), train=TrainConfig(output_dir="unused"))


def test_unused_lora_settings_are_not_checked() -> None:
    RunConfig(adapt=AdaptConfig(text_lora_r=0, vision_lora_alpha=0)).validate()


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_lora_target_that_matches_nothing(make_tiny_model, tower: str) -> None:
    model = make_tiny_model()
    adapt = AdaptConfig(**{f"use_{tower}_lora": True, f"{tower}_lora_targets": "q_proj,nope"})
    with pytest.raises(VQAConfigError, match=r"'nope'.*match no linear layer.*available: .*q_proj"):
        apply_adaptation(model, adapt)


def test_blind_model_has_no_vision_lora(make_tiny_model) -> None:
    with pytest.raises(VQAConfigError, match="blind"):
        apply_adaptation(make_tiny_model(blind=True), AdaptConfig(use_vision_lora=True))
    from vqadapt.config import ModelConfig

    with pytest.raises(VQAConfigError, match="--use_vision_lora needs a vision tower"):
        RunConfig(model=ModelConfig(blind=True), adapt=AdaptConfig(use_vision_lora=True)).validate()


# -- T5 family ------------------------------------------------------------------------------
def test_t5_text_lora_and_unfreeze(make_tiny_model, make_batch) -> None:
    model = make_tiny_model("t5")
    c = model.text.config
    inner = c.num_heads * c.d_kv
    assert inner != c.d_model  # so that A and B shapes cannot be confused
    assert model.text_layout.projections == ("q", "k", "v")
    assert resolve_targets("auto", model.text_layout, model.text_encoder_layers()[0]) == (
        "q",
        "k",
        "v",
    )
    plan = apply_adaptation(
        model, AdaptConfig(use_text_lora=True, text_lora_r=4, unfreeze_encoder_layers=2)
    )
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    pattern = (
        r"text\.encoder\.block\.\d\.layer\.0\.SelfAttention\.[qkv]\.lora_[AB]\.default\.weight"
    )
    assert lora and all(re.fullmatch(pattern, n) for n in lora)
    assert len(lora) == c.num_layers * 3 * 2
    lora_count = lora_qkv(c.num_layers, 4, c.d_model, inner)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == lora_count
    # T5 blocks: q, k, v, o (no biases), 2 RMS norms, wi, wo; block 0 also holds the
    # relative attention bias (frozen here, since only the last two blocks unfreeze).
    block = 3 * c.d_model * inner + inner * c.d_model + 2 * c.d_model + 2 * c.d_model * c.d_ff
    final_norm = c.d_model
    assert plan.per_tower["text_encoder"]["trainable"] == lora_count + 2 * block + final_norm
    assert plan.coverage == "all 4 layers (LoRA)"
    assert [row.mode for row in plan.layers if row.tower == "text_encoder"] == [
        "lora",
        "lora",
        "full+lora",
        "full+lora",
    ]

    model.train()
    batch = make_batch(model)
    logits = model(batch)
    assert logits.shape == (*batch["decoder_input_ids"].shape, c.vocab_size)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    loss.backward()
    params = dict(model.named_parameters())
    assert (
        params["text.encoder.block.0.layer.0.SelfAttention.q.lora_B.default.weight"]
        .grad.abs()
        .sum()
        > 0
    )
    assert params["text.encoder.block.3.layer.1.DenseReluDense.wi.weight"].grad.abs().sum() > 0
    assert params["text.encoder.block.0.layer.1.DenseReluDense.wi.weight"].grad is None


def test_t5_unfreeze_only(make_tiny_model, make_batch) -> None:
    model = make_tiny_model("t5")
    plan = apply_adaptation(model, AdaptConfig(unfreeze_encoder_layers=1))
    assert plan.coverage == "layers 4 only (25% of encoder)"
    assert plan.text_cache_layers == 3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder = {n for n in trainable if n.startswith("text.encoder.")}
    assert {n.split(".")[3] for n in encoder if ".block." in n} == {"3"}
    assert "text.encoder.final_layer_norm.weight" in encoder
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(make_batch(model))).all()


# -- exact counts without injection ---------------------------------------------------------
@pytest.mark.parametrize("family", ["mbart", "t5"])
@pytest.mark.parametrize("r", [4, 8])
def test_lora_parameter_count_matches_injection(make_tiny_model, family: str, r: int) -> None:
    predicted = {
        tower: lora_parameter_count(make_tiny_model(family), tower, "auto", r)
        for tower in ("text", "vision")
    }
    model = make_tiny_model(family)
    apply_adaptation(
        model,
        AdaptConfig(use_text_lora=True, text_lora_r=r, use_vision_lora=True, vision_lora_r=r),
    )
    injected = {
        tower: sum(
            p.numel()
            for n, p in model.named_parameters()
            if n.startswith(f"{tower}.") and "lora_" in n
        )
        for tower in ("text", "vision")
    }
    assert predicted == injected
    assert predicted["vision"] == lora_qkv(2, r, 24, 24)
    if family == "mbart":
        assert predicted["text"] == lora_qkv(12, r, 16, 16)
    assert lora_parameter_count(make_tiny_model(blind=True), "vision", "auto", r) == 0
