"""The adaptation menu: one choice per tower, LoRA variants, gradient checkpointing, trackers.

Each choice is checked on the tiny backbones for what trains (frozen parameters bit-identical
after an optimizer step, the trainable ones moved), for its exact parameter count against
arithmetic on the tiny configs (none of it read back from the code under test), and for save /
resume / export equivalence; gradient checkpointing for the same gradients; the activation
estimate against the tensors autograd saves.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from vqadapt import cli, menu
from vqadapt.ablation.runner import expected_cost, load_preset
from vqadapt.adapt import apply_adaptation, format_plan, lora_parameter_count
from vqadapt.checkpoint import TRAINED_FILE, load_checkpoint, save_checkpoint
from vqadapt.config import AdaptConfig, RunConfig, parse_run_config
from vqadapt.errors import VQAConfigError
from vqadapt.loop import make_optimizer
from vqadapt.memory import ActivationShapes, activation_bytes
from vqadapt.speed.packed import _vanilla_lora

# -- arithmetic on the tiny configs (conftest: TINY_MBART, TINY_DINO) ----------------------
D, ENC_FFN, DEC_FFN, VOCAB, POSITIONS = 16, 24, 40, 48, 32
ENC_LAYERS, DEC_LAYERS = 12, 2
VD, V_MLP, V_LAYERS, PATCHES = 24, 48, 2, (28 // 14) ** 2


def linear(d_in: int, d_out: int, bias: bool = True) -> int:
    return d_in * d_out + (d_out if bias else 0)


ENC_LAYER = 4 * linear(D, D) + 2 * 2 * D + linear(D, ENC_FFN) + linear(ENC_FFN, D)
DEC_LAYER = 8 * linear(D, D) + 3 * 2 * D + linear(D, DEC_FFN) + linear(DEC_FFN, D)
EMBEDDINGS = VOCAB * D + (POSITIONS + 2) * D + 2 * D  # tokens, learned positions, norm
ENCODER = EMBEDDINGS + ENC_LAYERS * ENC_LAYER + 2 * D  # + final norm
DECODER = EMBEDDINGS + DEC_LAYERS * DEC_LAYER + 2 * D  # its embedding copy is the LM head
# DINOv2 layer: norm1, q/k/v/out, layer scale, norm2, fc1, fc2, layer scale
V_LAYER = 2 * VD + 4 * linear(VD, VD) + VD + 2 * VD + linear(VD, V_MLP) + linear(V_MLP, VD) + VD
V_EMBEDDINGS = 2 * VD + (PATCHES + 1) * VD + linear(3 * 14 * 14, VD)  # cls, mask, positions, patch
VISION = V_EMBEDDINGS + V_LAYERS * V_LAYER + 2 * VD
PROJECTOR = 2 * VD + linear(VD, D) + linear(D, D) + 2 * D


def lora(r: int, d_in: int, d_out: int, dora: bool = False) -> int:
    """A (r x in) and B (out x r); DoRA adds a magnitude per output."""
    return r * (d_in + d_out) + (d_out if dora else 0)


# name -> (AdaptConfig settings, expected trainable per tower, text_cache_layers, flags)
CHOICES: dict[str, tuple[dict, dict[str, int]]] = {
    "seed baseline": ({}, {"projector": PROJECTOR, "text_decoder": DECODER}),
    "decoder lora (q/k/v of self- and cross-attention)": (
        {"text_decoder": "lora", "decoder_lora_r": 4},
        {"projector": PROJECTOR, "text_decoder": DEC_LAYERS * 6 * lora(4, D, D)},
    ),
    "decoder lora all-linear on layer 2": (
        {
            "text_decoder": "lora",
            "decoder_lora_r": 2,
            "decoder_lora_targets": "all-linear",
            "decoder_lora_layers": "2",
        },
        {
            "projector": PROJECTOR,
            "text_decoder": 8 * lora(2, D, D) + lora(2, D, DEC_FFN) + lora(2, DEC_FFN, D),
        },
    ),
    "decoder last_n:1": (
        {"text_decoder": "last_n:1"},
        {"projector": PROJECTOR, "text_decoder": DEC_LAYER + 2 * D},
    ),
    "decoder frozen, text lora": (
        {"text_decoder": "frozen", "use_text_lora": True, "text_lora_r": 4},
        {"projector": PROJECTOR, "text_encoder": ENC_LAYERS * 3 * lora(4, D, D)},
    ),
    "projector frozen, unfreeze 3": (
        {"projector": "frozen", "unfreeze_encoder_layers": 3},
        {"text_encoder": 3 * ENC_LAYER + 2 * D, "text_decoder": DECODER},
    ),
    "projector lora": (
        {"projector": "lora", "projector_lora_r": 4},
        {"projector": lora(4, VD, D) + lora(4, D, D), "text_decoder": DECODER},
    ),
    "vision last_n:1": (
        {"vision_encoder": "last_n:1"},
        {"vision": V_LAYER + 2 * VD, "projector": PROJECTOR, "text_decoder": DECODER},
    ),
    "vision full (not the masked-image token, which never runs)": (
        {"vision_encoder": "full"},
        {"vision": VISION - VD, "projector": PROJECTOR, "text_decoder": DECODER},
    ),
    "vision last_n:1+lora": (
        {"vision_encoder": "last_n:1+lora", "vision_lora_r": 2},
        {
            "vision": V_LAYER + 2 * VD + V_LAYERS * 3 * lora(2, VD, VD),
            "projector": PROJECTOR,
            "text_decoder": DECODER,
        },
    ),
    "text full": (
        {"text_encoder": "full"},
        {"text_encoder": ENCODER, "projector": PROJECTOR, "text_decoder": DECODER},
    ),
    "text lora on layers 10-12, all-linear": (
        {
            "text_encoder": "lora",
            "text_lora_r": 2,
            "text_lora_layers": "10-12",
            "text_lora_targets": "all-linear",
        },
        {
            "text_encoder": 3 * (4 * lora(2, D, D) + lora(2, D, ENC_FFN) + lora(2, ENC_FFN, D)),
            "projector": PROJECTOR,
            "text_decoder": DECODER,
        },
    ),
    "dora r8": (
        {"use_text_lora": True, "text_lora_r": 8, "lora_variant": "dora"},
        {
            "text_encoder": ENC_LAYERS * 3 * lora(8, D, D, dora=True),
            "projector": PROJECTOR,
            "text_decoder": DECODER,
        },
    ),
    "rslora r32": (
        {"use_text_lora": True, "text_lora_r": 32, "lora_variant": "rslora"},
        {
            "text_encoder": ENC_LAYERS * 3 * lora(32, D, D),
            "projector": PROJECTOR,
            "text_decoder": DECODER,
        },
    ),
    "pissa r4": (
        {"use_text_lora": True, "text_lora_r": 4, "lora_variant": "pissa"},
        {
            "text_encoder": ENC_LAYERS * 3 * lora(4, D, D),
            "projector": PROJECTOR,
            "text_decoder": DECODER,
        },
    ),
    "decoder dora + vision lora": (
        {
            "text_decoder": "lora",
            "decoder_lora_r": 2,
            "lora_variant": "dora",
            "use_vision_lora": True,
            "vision_lora_r": 2,
        },
        {
            "vision": V_LAYERS * 3 * lora(2, VD, VD, dora=True),
            "projector": PROJECTOR,
            "text_decoder": DEC_LAYERS * 6 * lora(2, D, D, dora=True),
        },
    ),
}
TOTALS = {
    "vision": VISION,
    "projector": PROJECTOR,
    "text_encoder": ENCODER,
    "text_decoder": DECODER,
}


def one_step(model, batch) -> None:
    """One AdamW step of vqadapt's optimizer on the weighted loss."""
    optimizer = make_optimizer(model, lr=1e-2, vision_lr=1e-2, weight_decay=0.0)
    model.train()
    loss = model(batch, return_losses=True).mean()
    loss.backward()
    optimizer.step()


def test_the_arithmetic_matches_fresh_modules(make_tiny_model) -> None:
    model = make_tiny_model()
    towers = {
        "vision": model.vision,
        "projector": model.projector,
        "text_encoder": model.text_encoder,
    }
    for tower, module in towers.items():
        assert sum(p.numel() for p in module.parameters()) == TOTALS[tower], tower
    everything = sum(p.numel() for p in model.parameters())
    assert everything == sum(TOTALS.values())


@pytest.mark.parametrize("name", list(CHOICES))
def test_each_choice_trains_what_it_says(make_tiny_model, make_batch, name: str) -> None:
    settings, expected = CHOICES[name]
    model = make_tiny_model(speed="library")
    plan = apply_adaptation(model, AdaptConfig(**settings))
    for tower in menu.TOWERS:
        lora_total = sum(
            p.numel() for n, p in model.named_parameters() if ".lora_" in n
            and {"vision": n.startswith("vision."), "projector": n.startswith("projector."),
                 "text_encoder": n.startswith("text.model.encoder."),
                 "text_decoder": n.startswith("text.model.decoder.")}[tower]
        )  # fmt: skip
        assert plan.per_tower[tower]["trainable"] == expected.get(tower, 0), tower
        assert plan.per_tower[tower]["total"] == TOTALS[tower] + lora_total, tower
    assert plan.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the optimizer state is exact: two moments per value and a step count per tensor
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, lr=1e-2, vision_lr=1e-2, weight_decay=0.0)
    model.train()
    model(make_batch(model), return_losses=True).mean().backward()
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert state == plan.optimizer_state_bytes
    moved_towers = set()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
        elif not torch.equal(p, before[n]):
            moved_towers.add(n.split(".")[0] if not n.startswith("text.") else n)
    assert moved_towers, "nothing trained"


def test_choices_spelled_with_tower_flags_equal_the_seed_flags(make_tiny_model) -> None:
    pairs = [
        ({"unfreeze_encoder_layers": 3}, {"text_encoder": "last_n:3"}),
        ({"use_text_lora": True}, {"text_encoder": "lora"}),
        ({"use_text_lora": True, "unfreeze_encoder_layers": 2}, {"text_encoder": "last_n:2+lora"}),
        ({"use_vision_lora": True}, {"vision_encoder": "lora"}),
    ]
    for seed, menu_flags in pairs:
        a, b = make_tiny_model(), make_tiny_model()
        plan_a = apply_adaptation(a, AdaptConfig(**seed))
        plan_b = apply_adaptation(b, AdaptConfig(**menu_flags))
        assert plan_a.to_dict() == plan_b.to_dict()
        assert [n for n, p in a.named_parameters() if p.requires_grad] == [
            n for n, p in b.named_parameters() if p.requires_grad
        ]


# -- the grammar ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "tower", "expected"),
    [
        ("frozen", "text_encoder", "frozen"),
        ("full", "vision", "full"),
        (" last_n:3 ", "text_decoder", "last_n:3"),
        ("lora", "projector", "lora"),
        ("lora+last_n:2", "vision", "last_n:2+lora"),
    ],
)
def test_the_grammar(text: str, tower: str, expected: str) -> None:
    assert str(menu.parse_choice(text, tower)) == expected


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"text_encoder": "last_n:0"}, "last_n needs N >= 1"),
        ({"text_encoder": "last_n:x"}, "--text_encoder must be one of frozen, full, last_n:N"),
        ({"projector": "last_n:1"}, "the projector has no layer stack"),
        ({"text_decoder": "full+lora"}, "--text_decoder must be one of"),
        ({"vision_encoder": "lora+lora"}, "names a part twice"),
        (
            {"text_encoder": "lora", "unfreeze_encoder_layers": 3},
            "--text_encoder lora contradicts --unfreeze_encoder_layers / --use_text_lora",
        ),
        ({"vision_encoder": "frozen", "use_vision_lora": True}, "contradicts --use_vision_lora"),
        ({"text_decoder": "frozen", "projector": "frozen"}, "nothing would train"),
        ({"text_lora_layers": "0-2"}, "not a range of layers counted from 1"),
        ({"decoder_lora_layers": "two"}, "--decoder_lora_layers must be 'all' or 1-based"),
        ({"text_decoder": "lora", "decoder_lora_r": 0}, "--decoder_lora_r must be > 0"),
        ({"projector": "lora", "projector_lora_dropout": 1.0}, "--projector_lora_dropout must be"),
        ({"lora_variant": "qlora"}, "lora_variant must be one of lora, dora, rslora, pissa"),
        ({"gradient_checkpointing_towers": "projector"}, "--gradient_checkpointing_towers must"),
        ({"report_to": "tensorboard,comet"}, "--report_to must be all, none or"),
    ],
)
def test_refused_choices_say_why(settings: dict, message: str) -> None:
    with pytest.raises(VQAConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        RunConfig.from_dict(settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"text_decoder": "last_n:3"},
            "--text_decoder last_n:3 is out of range: the text decoder has 2 layers",
        ),
        ({"vision_encoder": "last_n:5"}, "the vision encoder has 2 layers"),
        (
            {"text_encoder": "lora", "text_lora_layers": "12-13"},
            "--text_lora_layers 12-13: the text encoder has 12 layers",
        ),
        ({"text_decoder": "lora", "decoder_lora_targets": "wo"}, "'wo'.*match no linear layer"),
        (
            {"projector": "lora", "projector_lora_targets": "fc3"},
            "match no linear layer of the projector",
        ),
    ],
)
def test_choices_that_do_not_fit_the_model(make_tiny_model, settings: dict, message: str) -> None:
    model = make_tiny_model()
    with pytest.raises(VQAConfigError, match=message):
        apply_adaptation(model, AdaptConfig(**settings))
    assert not [n for n, _ in model.named_parameters() if ".lora_" in n]


def test_a_blind_model_refuses_vision_and_projector_choices() -> None:
    for flag in (["--vision_encoder", "last_n:1"], ["--projector", "frozen"]):
        with pytest.raises(VQAConfigError, match="needs a vision tower, but --blind removes it"):
            parse_run_config(["--blind", *flag])
    with pytest.raises(VQAConfigError, match="nothing would train: --blind"):
        parse_run_config(["--blind", "--text_decoder", "frozen"])


SEED_COMMANDS = {  # the README's seed command lines (data flags omitted), verbatim
    "--unfreeze_encoder_layers 0": ("frozen encoders (baseline)", "frozen"),
    "--unfreeze_encoder_layers 3": ("unfreeze last 3 text-encoder layers", "last_n:3"),
    "--use_text_lora --text_lora_r 8 --unfreeze_encoder_layers 0": (
        "text LoRA r=8 alpha=32",
        "lora",
    ),
    "--use_vision_lora --use_text_lora --text_lora_r 16": (
        "text LoRA r=16 alpha=32 + vision LoRA r=8 alpha=16",
        "lora",
    ),
    "--use_vision_lora --vision_lora_r 8 --vision_lora_alpha 16 --use_text_lora --text_lora_r 16 "
    "--text_lora_alpha 32 --unfreeze_encoder_layers 0 --dropout 0.2 --weight_decay 0.1 --lr 5e-5 "
    "--scheduler cosine --early_stopping_patience 5": (
        "text LoRA r=16 alpha=32 + vision LoRA r=8 alpha=16",
        "lora",
    ),
}


@pytest.mark.parametrize("command", list(SEED_COMMANDS))
def test_the_seed_command_lines_still_mean_what_they_meant(make_tiny_model, command: str) -> None:
    from vqadapt.adapt import describe_strategy

    strategy, text_choice = SEED_COMMANDS[command]
    config = parse_run_config(command.split())
    choices = menu.resolve(config.adapt)
    assert str(choices["text_encoder"]) == text_choice
    assert (str(choices["projector"]), str(choices["text_decoder"])) == ("full", "full")
    assert describe_strategy(config.adapt, blind=False) == strategy


# -- the decoder's tied embedding and LM head -----------------------------------------------
@pytest.mark.parametrize("family", ["mbart", "t5"])
@pytest.mark.parametrize("decoder", ["lora", "last_n:1", "frozen", "full"])
def test_lm_head_trains_with_the_decoder_embedding_only_under_full(
    make_tiny_model, make_batch, family: str, decoder: str
) -> None:
    model = make_tiny_model(family, speed="library")
    apply_adaptation(model, AdaptConfig(text_decoder=decoder, use_text_lora=True, text_lora_r=2))
    text = model.text
    head = text.get_output_embeddings().weight
    decoder_embedding = text.get_decoder().get_input_embeddings().weight
    encoder_embedding = text.get_encoder().get_input_embeddings().weight
    if family == "mbart":  # tied to each other, never to the encoder's
        assert head is decoder_embedding
    assert head is not encoder_embedding and decoder_embedding is not encoder_embedding
    assert head.requires_grad is (decoder == "full")
    assert decoder_embedding.requires_grad is (decoder == "full")
    assert not encoder_embedding.requires_grad
    assert not [n for n, _ in text.named_parameters() if ".lora_" in n and "lm_head" in n]
    saved = head.detach().clone(), encoder_embedding.detach().clone()
    one_step(model, make_batch(model))
    assert torch.equal(encoder_embedding, saved[1])
    assert torch.equal(head, saved[0]) is (decoder != "full")


def test_a_frozen_decoder_runs_in_eval_mode_and_frozen_layers_too(make_tiny_model) -> None:
    model = make_tiny_model()
    apply_adaptation(
        model,
        AdaptConfig(text_decoder="frozen", vision_encoder="last_n:1", use_text_lora=True),
    )
    model.train()
    assert not model.text.get_decoder().training
    assert not model.vision_layers()[0].training and model.vision_layers()[1].training
    assert model.projector.training and model.text_encoder_layers()[0].training


@pytest.mark.parametrize(
    ("settings", "cache_layers", "vision_frozen", "embeddings_frozen"),
    [
        ({}, 12, True, True),
        ({"text_encoder": "lora", "text_lora_layers": "10-12"}, 9, True, True),
        ({"text_encoder": "last_n:2+lora", "text_lora_layers": "4,6"}, 3, True, True),
        ({"text_encoder": "full"}, 0, True, True),
        ({"vision_encoder": "last_n:1"}, 12, False, True),
        ({"vision_encoder": "full"}, 12, False, False),
    ],
)
def test_what_the_caches_may_keep(
    make_tiny_model, settings, cache_layers, vision_frozen, embeddings_frozen
) -> None:
    model = make_tiny_model()
    plan = apply_adaptation(model, AdaptConfig(**settings))
    assert plan.text_cache_layers == model.text_cache_layers == cache_layers
    assert (model.vision_frozen, model.vision_embeddings_frozen) == (
        vision_frozen,
        embeddings_frozen,
    )
    for name, param in model.named_parameters():
        prefix = "text.model.encoder.layers."
        if name.startswith(prefix) and int(name.split(".")[4]) < cache_layers:
            assert not param.requires_grad, name


# -- LoRA variants --------------------------------------------------------------------------
def test_variants_reach_peft(make_tiny_model) -> None:
    for variant, alpha, r in (("lora", 16, 8), ("rslora", 64, 32), ("dora", 16, 8)):
        model = make_tiny_model()
        apply_adaptation(
            model,
            AdaptConfig(
                use_text_lora=True, text_lora_r=r, text_lora_alpha=alpha, lora_variant=variant
            ),
        )
        q = model.text_encoder_layers()[0].self_attn.q_proj
        expected = alpha / math.sqrt(r) if variant == "rslora" else alpha / r
        assert q.scaling["default"] == pytest.approx(expected)
        assert bool(q.lora_variant) is (variant == "dora")


def test_pissa_keeps_the_function_and_checkpoints_the_residual(make_tiny_model, tmp_path) -> None:
    model = make_tiny_model()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapt = AdaptConfig(
        use_text_lora=True, text_lora_r=4, text_lora_dropout=0.0, lora_variant="pissa"
    )
    apply_adaptation(model, adapt)
    q = model.text_encoder_layers()[0].self_attn.q_proj
    residual = q.base_layer.weight
    assert not torch.equal(
        residual, original["text.model.encoder.layers.0.self_attn.q_proj.weight"]
    )
    rebuilt = (
        residual + q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight
    )
    torch.testing.assert_close(
        rebuilt, original["text.model.encoder.layers.0.self_attn.q_proj.weight"], atol=1e-5, rtol=0
    )
    assert len(model.rewritten_weights) == 36
    save_checkpoint(model, tmp_path / "ckpt")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ckpt" / TRAINED_FILE))
    assert set(model.rewritten_weights) <= set(saved)


def test_dora_takes_the_module_by_module_path_of_the_packed_encoder(
    make_tiny_model, make_batch
) -> None:
    adapt = AdaptConfig(use_text_lora=True, text_lora_r=4, lora_variant="dora")
    packed, library = make_tiny_model(speed="cpu"), make_tiny_model(speed="library")
    for model in (packed, library):
        torch.manual_seed(0)  # the same adapters
        apply_adaptation(model, adapt)
        with torch.no_grad():  # B = 0 at init: make the adapters matter
            for n, p in model.named_parameters():
                if "lora_B" in n or "magnitude" in n:
                    p.add_(0.1)
    from vqadapt import speed

    speed.install(packed, speed.SpeedPaths.for_device("cpu"))
    assert packed.speed_paths.packed_encoder
    q = packed.text_encoder_layers()[0].self_attn.q_proj
    assert _vanilla_lora(q) is None  # DoRA is not the fused path's plain adapter
    plain = make_tiny_model()
    apply_adaptation(plain, AdaptConfig(use_text_lora=True, text_lora_r=4))
    assert _vanilla_lora(plain.text_encoder_layers()[0].self_attn.q_proj) == "default"
    batch = make_batch(packed, batch_size=4)
    packed.eval(), library.eval()
    with torch.no_grad():
        mask = batch["attention_mask"].bool()
        a = packed.encode_text_suffix(
            packed.encode_text_prefix(batch["input_ids"], batch["attention_mask"]),
            batch["attention_mask"],
        )
        b = library.encode_text_suffix(
            library.encode_text_prefix(batch["input_ids"], batch["attention_mask"]),
            batch["attention_mask"],
        )
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=0)


def test_lora_parameter_count_covers_targets_layers_and_dora(make_tiny_model) -> None:
    model = make_tiny_model()
    assert lora_parameter_count(model, "decoder", "auto", 4) == DEC_LAYERS * 6 * lora(4, D, D)
    assert lora_parameter_count(model, "text", "all-linear", 2, (10, 11, 12)) == 3 * (
        4 * lora(2, D, D) + lora(2, D, ENC_FFN) + lora(2, ENC_FFN, D)
    )
    assert lora_parameter_count(model, "vision", "auto", 2, None, "dora") == V_LAYERS * 3 * lora(
        2, VD, VD, dora=True
    )
    assert lora_parameter_count(model, "projector", "auto", 4) == lora(4, VD, D) + lora(4, D, D)
    # the same on a model that holds LoRA already (vqadapt plan --rank_table)
    apply_adaptation(model, AdaptConfig(use_text_lora=True, text_decoder="lora"))
    assert lora_parameter_count(model, "decoder", "auto", 4) == DEC_LAYERS * 6 * lora(4, D, D)


# -- save / load ----------------------------------------------------------------------------
SAVED = {
    "decoder lora + text lora (two adapters in the text model)": {
        "text_decoder": "lora", "use_text_lora": True, "decoder_lora_targets": "all-linear",
    },
    "dora everywhere": {
        "use_text_lora": True, "use_vision_lora": True, "projector": "lora",
        "text_decoder": "lora", "lora_variant": "dora",
    },
    "pissa": {"use_text_lora": True, "lora_variant": "pissa", "text_decoder": "last_n:1"},
    "vision full, projector frozen": {"vision_encoder": "full", "projector": "frozen"},
}  # fmt: skip


@pytest.mark.parametrize("name", list(SAVED))
def test_a_checkpoint_restores_every_weight(make_tiny_model, tmp_path: Path, name: str) -> None:
    adapt = AdaptConfig(**SAVED[name])
    trained = make_tiny_model(seed=0)
    apply_adaptation(trained, adapt)
    with torch.no_grad():  # stands for training: every trainable value moves
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    save_checkpoint(trained, tmp_path / "best", base_models={"text": "t", "vision": "v"})
    folders = (
        sorted(p.name for p in (tmp_path / "best" / "adapters").iterdir())
        if (tmp_path / "best" / "adapters").is_dir()
        else []
    )
    expected = sorted(
        folder
        for tower, folder in (
            ("text_encoder", "text"),
            ("text_decoder", "decoder"),
            ("vision", "vision"),
            ("projector", "projector"),
        )
        if menu.resolve(adapt)[tower].lora
    )
    assert folders == expected
    fresh = make_tiny_model(seed=0)
    apply_adaptation(fresh, adapt)
    load_checkpoint(fresh, tmp_path / "best")
    a, b = trained.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_decoder_adapter_loads_with_peft_on_the_text_model(make_tiny_model, tmp_path) -> None:
    from peft import PeftModel

    model = make_tiny_model()
    apply_adaptation(model, AdaptConfig(text_decoder="lora", use_text_lora=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt/adapters/decoder/adapter_config.json").read_text())
    assert "decoder" in config["target_modules"]
    from conftest import tiny_text_model

    torch.manual_seed(0)
    plain = tiny_text_model()
    plain.load_state_dict(
        {
            k.replace(".base_layer.", "."): v
            for k, v in model.text.state_dict().items()
            if ".lora_" not in k
        }
    )
    peft_model = PeftModel.from_pretrained(plain, str(tmp_path / "ckpt/adapters/decoder"))
    ours = dict(model.text.named_parameters())
    for name, value in peft_model.named_parameters():
        if ".lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".default.", ".text_decoder.")
            assert torch.equal(value, ours[key]), name


# -- gradient checkpointing -----------------------------------------------------------------
@pytest.mark.parametrize("profile", ["library", "cpu"])
@pytest.mark.parametrize(
    "settings",
    [
        {"use_text_lora": True, "vision_encoder": "last_n:1"},
        {"text_encoder": "full", "vision_encoder": "full", "text_decoder": "lora"},
    ],
    ids=["lora", "full"],
)
def test_gradient_checkpointing_gives_the_same_gradients(
    make_tiny_model, make_batch, profile: str, settings: dict
) -> None:
    grads, saved = {}, {}
    for checkpointed in (False, True):
        model = make_tiny_model(speed=profile, dropout=0.3)  # dropout: the masks must recur
        if checkpointed:
            model.set_gradient_checkpointing(menu.CHECKPOINTABLE)
        apply_adaptation(model, AdaptConfig(**settings))
        from vqadapt import speed

        speed.install(
            model,
            speed.SpeedPaths.for_device("cpu") if profile == "cpu" else speed.SpeedPaths.library(),
        )
        model.train()
        batch = make_batch(model, batch_size=4)
        torch.manual_seed(1)
        stored = []

        def keep(t, stored=stored):
            stored.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(batch, return_losses=True).mean()
        loss.backward()
        saved[checkpointed] = sum(stored)
        grads[checkpointed] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-6, rtol=1e-5)
    assert saved[True] < saved[False] / 2


def test_checkpointing_only_the_towers_asked(make_tiny_model) -> None:
    model = make_tiny_model()
    model.set_gradient_checkpointing(("text_decoder",))
    assert all(layer.gradient_checkpointing for layer in model.decoder_layers())
    assert not any(layer.gradient_checkpointing for layer in model.text_encoder_layers())
    assert not any(layer.gradient_checkpointing for layer in model.vision_layers())
    model.set_gradient_checkpointing(())
    assert not any(layer.gradient_checkpointing for layer in model.decoder_layers())


# -- the memory estimate --------------------------------------------------------------------
def saved_tensor_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (each storage once)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch, return_losses=True).mean()
    return sum(storages.values())


def full_batch(model, batch: int, question: int, answer: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    vocab = model.text.config.vocab_size
    ids = torch.randint(3, vocab, (batch, question), generator=generator)
    labels = torch.randint(3, vocab, (batch, answer), generator=generator)
    start = torch.full((batch, 1), model.decoder_start_token_id)
    size = model.vision.config.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": torch.cat([start, labels[:, :-1]], dim=1),
        "labels": labels,
        "weights": torch.ones(batch),
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator),
    }


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"use_text_lora": True},
        {"unfreeze_encoder_layers": 3},
        {"text_decoder": "lora"},
        {"text_decoder": "frozen", "text_encoder": "lora", "text_lora_layers": "2"},
    ],
    ids=["baseline", "text-lora", "unfreeze3", "decoder-lora", "frozen-layers-in-the-path"],
)
@pytest.mark.parametrize("checkpointed", [False, True])
def test_the_activation_estimate_is_near_what_autograd_keeps(
    make_tiny_model, settings: dict, checkpointed: bool
) -> None:
    model = make_tiny_model(max_position_embeddings=64, speed="library")
    if checkpointed:
        model.set_gradient_checkpointing(menu.CHECKPOINTABLE)
    shapes = ActivationShapes(batch=8, question_tokens=32, answer_tokens=8, image_tokens=5)
    apply_adaptation(model, AdaptConfig(**settings), shapes=shapes)
    model.train()
    measured = saved_tensor_bytes(model, full_batch(model, 8, 32, 8))
    per_tower = activation_bytes(model, shapes)
    estimate = sum((a.checkpointed if checkpointed else a.plain) for a in per_tower.values())
    assert 0.6 < estimate / measured < 1.5, (estimate, measured)


def test_the_plan_shows_mib_with_activations_and_the_checkpointing_saving(make_tiny_model) -> None:
    model = make_tiny_model()
    model.set_gradient_checkpointing(("text_encoder",))
    plan = apply_adaptation(model, AdaptConfig(use_text_lora=True))
    mem = plan.memory_estimate_mib
    assert mem["checkpointed"] == ["text_encoder"]
    assert (
        mem["activations_with_checkpointing"]
        < mem["activations"]
        < mem["activations_without_checkpointing"]
    )
    text = format_plan(plan)
    assert " MB" not in text and "MiB" in text
    assert f"({plan.optimizer_state_bytes:,} bytes)" in text
    assert re.search(r"activations fp32 at batch 32, 48 question / 16 answer / 5 image", text)
    assert "gradient checkpointing: text_encoder" in text


# -- the CLI --------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code or 0


def test_plan_of_a_menu_config(vqa_env, capsys) -> None:
    argv = [
        *vqa_env.data_flags(), "--text_decoder", "lora", "--lora_variant", "dora",
        "--vision_encoder", "last_n:2", "--gradient_checkpointing", "--batch_size", "8",
        "--mixed_precision", "bf16",
    ]  # fmt: skip
    assert run_cli(["plan", *argv]) == 0
    out = capsys.readouterr().out
    assert "towers: vision last_n:2, projector full, text_encoder frozen, text_decoder lora" in out
    assert "strategy: frozen encoders (baseline) + unfreeze last 2 vision layers" not in out
    assert "decoder DoRA r=16 alpha=32" in out
    assert "activations bf16 at batch 8" in out
    assert "gradient checkpointing: vision, text_encoder, text_decoder" in out
    rows = re.findall(r"^text_decoder\s+(\d+)\s+(\S+)\s", out, re.M)
    assert [mode for _, mode in rows] == ["lora", "lora"]


# -- trackers -------------------------------------------------------------------------------
def tracker_run(vqa_env, out: Path, *flags: str) -> dict:
    from vqadapt.train import train

    return train(vqa_env.config(out, "--log_every", "1", *flags), log=lambda _: None)


def test_tensorboard_is_the_default_tracker(vqa_env, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker_run(vqa_env, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/lr", "val/loss", "val/em"} <= scalars
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 4  # 64 / 16


def test_report_to_none_writes_no_tracker_files(vqa_env, tmp_path: Path) -> None:
    tracker_run(vqa_env, tmp_path / "run", "--report_to", "none")
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_missing_tracker_package_is_named(vqa_env, tmp_path: Path, monkeypatch) -> None:
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(
        VQAConfigError,
        match=r"--report_to wandb needs the wandb package: pip install 'vqadapt\[wandb\]'",
    ):
        tracker_run(vqa_env, tmp_path / "run", "--report_to", "tensorboard,wandb")
    assert not (tmp_path / "run").exists()


def test_wandb_offline(vqa_env, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    run = tmp_path / "run"
    tracker_run(vqa_env, run, "--report_to", "wandb")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert not (run / "tensorboard").exists()


def test_mlflow_to_a_local_store(vqa_env, tmp_path: Path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a folder: no server, no database
    tracker_run(vqa_env, tmp_path / "run", "--report_to", "mlflow,tensorboard")
    client = mlflow.tracking.MlflowClient(store.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "vqadapt"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    assert run.data.params["text_decoder"] == "full"
    assert (tmp_path / "run" / "tensorboard").is_dir()


# -- the ablation runner --------------------------------------------------------------------
def test_the_beyond_seed_preset_adds_four_cells_to_the_seeds_six() -> None:
    seed, beyond = load_preset("seed"), load_preset("beyond-seed")
    assert [e.name for e in beyond.experiments[:6]] == [e.name for e in seed.experiments]
    assert [e.overrides for e in beyond.experiments[:6]] == [e.overrides for e in seed.experiments]
    added = {e.name: e.overrides for e in beyond.experiments[6:]}
    assert list(added) == ["decoder_lora", "vision_last2", "dora_r8", "rslora_r32"]
    choices = {
        name: menu.resolve(RunConfig.from_dict({**beyond.defaults, **beyond.base, **o}).adapt)
        for name, o in added.items()
    }
    assert str(choices["decoder_lora"]["text_decoder"]) == "lora"
    assert str(choices["vision_last2"]["vision"]) == "last_n:2"
    assert added["dora_r8"]["lora_variant"] == "dora" and added["dora_r8"]["text_lora_r"] == 8
    assert added["rslora_r32"]["lora_variant"] == "rslora"
    costs = {
        e.name: expected_cost(RunConfig.from_dict({**beyond.base, **e.overrides}))
        for e in beyond.experiments
    }
    assert costs["vision_last2"] > costs["lora_r16"] > costs["baseline"]


def test_a_preset_can_add_to_the_one_it_extends(tmp_path: Path) -> None:
    path = tmp_path / "more.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "extends": "seed",
                "add_experiments": [{"name": "x", "overrides": {"text_decoder": "lora"}}],
            }
        ),
        encoding="utf-8",
    )
    preset = load_preset(str(path))
    assert [e.name for e in preset.experiments][-2:] == ["vision_text_lora", "x"]


# -- a run: resume and export ---------------------------------------------------------------
RUNS = {
    "dora on three towers, vision last 1, checkpointing": [
        "--vision_encoder", "last_n:1", "--projector", "lora", "--use_text_lora",
        "--text_decoder", "lora", "--decoder_lora_targets", "all-linear", "--lora_variant", "dora",
        "--gradient_checkpointing",
    ],
    "pissa text, decoder last 1, frozen projector": [
        "--use_text_lora", "--lora_variant", "pissa", "--text_decoder", "last_n:1",
        "--projector", "frozen",
    ],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_a_menu_run_resumes_exactly_and_exports(vqa_env, tmp_path: Path, name: str) -> None:
    from vqadapt.export import export_run, load_exported
    from vqadapt.inference import load_run
    from vqadapt.io import read_jsonl
    from vqadapt.train import train

    flags = [*RUNS[name], "--epochs", "2", "--lr", "1e-2", "--report_to", "none"]
    straight = tmp_path / "straight"
    train(vqa_env.config(straight, *flags), log=lambda _: None)
    resumed = tmp_path / "resumed"
    assert train(vqa_env.config(resumed, *flags), log=lambda _: None, stop_after_epoch=1) == {
        "interrupted_after": 1
    }
    train(vqa_env.config(resumed, *flags, "--resume"), log=lambda _: None)
    for a, b in zip(
        read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl"), strict=True
    ):
        for key in ("train_loss", "val_loss", "val_em"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert read_jsonl(straight / "predictions_test.jsonl") == read_jsonl(
        resumed / "predictions_test.jsonl"
    )
    summary = json.loads((straight / "summary.json").read_text(encoding="utf-8"))
    assert summary["plan"]["choices"] == menu_choices(vqa_env.config(straight, *flags))
    reference = load_run(straight, merge=False, device="cpu", precision="no")
    for merge in (False, True):
        out = tmp_path / f"export-{merge}"
        report = export_run(straight, out, merge=merge, log=lambda _: None, device="cpu")
        assert (
            report["status"] == "passed" and report["identical_predictions"] == report["questions"]
        )
        settings = json.loads((out / "vqadapt_export.json").read_text(encoding="utf-8"))
        expected = [] if merge else sorted(
            {"text_encoder": "text", "text_decoder": "decoder", "vision": "vision",
             "projector": "projector"}[tower]
            for tower, choice in summary["plan"]["choices"].items() if "lora" in choice
        )  # fmt: skip
        assert sorted(settings["adapters"]) == expected
        exported = load_exported(out, device="cpu", precision="no")
        batch = full_batch(exported.model, 4, 8, 4)
        with torch.no_grad():
            diff = (exported.model(batch) - reference.model(batch)).abs().max().item()
        assert diff <= (1e-3 if merge else 1e-5), diff


def menu_choices(config: RunConfig) -> dict[str, str]:
    return {tower: str(choice) for tower, choice in menu.resolve(config.adapt).items()}


def test_the_report_shows_exact_parameter_counts(tmp_path: Path) -> None:
    from fake_study import build_fake_study
    from vqadapt.ablation.report import write_report

    study = build_fake_study(tmp_path / "study")
    markdown = write_report(study)["report.md"].read_text(encoding="utf-8")
    coverage = markdown.split("## Parameters and coverage", 1)[1].split("\n## ", 1)[0]
    for cell in (study / "lora_r8").glob("seed*/summary.json"):
        trainable = json.loads(cell.read_text(encoding="utf-8"))["params"]["trainable"]
        assert f"lora_r8 {trainable:,};" in coverage
        break
    else:
        pytest.fail("no lora_r8 cell")


def test_the_cache_keeps_only_what_does_not_train(vqa_env, tmp_path: Path) -> None:
    from vqadapt.build import build_data, build_model

    for choice, embeddings in (("last_n:1", True), ("full", False)):
        config = vqa_env.config(tmp_path / choice, "--vision_encoder", choice)
        model, _, tokenizer, preprocessing = build_model(config, vqa_env.backbones())
        data = build_data(
            config, model, tokenizer, preprocessing, vqa_env.backbones(), log=lambda _: None
        )
        assert data.features.vision_features is None
        assert (data.features.vision_embeddings is not None) is embeddings, choice
