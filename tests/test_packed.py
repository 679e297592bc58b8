"""The packed text encoder (real tokens only) against transformers' padded one."""

from __future__ import annotations

import pytest
import torch

from vqadapt import speed
from vqadapt.adapt import apply_adaptation
from vqadapt.config import AdaptConfig
from vqadapt.speed import SpeedPaths
from vqadapt.speed.packed import PackedEncoder, Packing


def library_encoder(model, batch) -> torch.Tensor:
    return model.text_encoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state


def packed_encoder(model, batch) -> torch.Tensor:
    assert isinstance(model.encoder_runner, PackedEncoder)  # installed by the CPU profile
    mask = batch["attention_mask"]
    return model.encode_text_suffix(model.encode_text_prefix(batch["input_ids"], mask), mask)


def test_packing_round_trip() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 1]])  # right and left padding
    states = torch.randn(3, 4, 2)
    packing = Packing.of(mask)
    packed = packing.gather(states)
    assert packed.shape == (7, 2)
    torch.testing.assert_close(packed, states[mask.bool()], rtol=0, atol=0)
    back = packing.scatter(packed)
    torch.testing.assert_close(back[mask.bool()], states[mask.bool()], rtol=0, atol=0)
    assert back[~mask.bool()].abs().sum() == 0


@pytest.mark.parametrize(
    "adapt",
    [AdaptConfig(unfreeze_encoder_layers=3), AdaptConfig(use_text_lora=True, text_lora_r=4)],
    ids=["unfreeze3", "text_lora"],
)
def test_packed_encoder_equals_the_library_in_values_and_gradients(
    make_tiny_model, make_batch, adapt: AdaptConfig
) -> None:
    model = make_tiny_model()
    apply_adaptation(model, adapt)
    model.eval()  # no dropout: the two must agree exactly up to rounding
    batch = make_batch(model, batch_size=4)
    keep = batch["attention_mask"].bool()
    assert not keep.all()  # padding is part of the test
    outputs, grads = {}, {}
    probe = torch.randn(*keep.shape, model.text.config.d_model)
    for name, run in (("library", library_encoder), ("packed", packed_encoder)):
        model.zero_grad(set_to_none=True)
        out = run(model, batch)
        (out[keep] * probe[keep]).sum().backward()  # only real positions are ever read
        outputs[name] = out
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(outputs["packed"][keep], outputs["library"][keep], rtol=0, atol=1e-5)
    assert outputs["packed"][~keep].abs().sum() == 0
    assert grads["packed"].keys() == grads["library"].keys() and grads["packed"]
    for name, grad in grads["library"].items():
        torch.testing.assert_close(grads["packed"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_encoder_trains_with_dropout_on_real_tokens(make_tiny_model, make_batch) -> None:
    model = make_tiny_model()
    apply_adaptation(model, AdaptConfig(unfreeze_encoder_layers=3))
    model.train()
    batch = make_batch(model, batch_size=4)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        first, second = packed_encoder(model, batch), packed_encoder(model, batch)
        model.eval()
        plain = packed_encoder(model, batch)
    assert not torch.equal(first[keep], second[keep])  # the trainable layers drop out
    # ... around the same function: dropout noise, not a different computation
    assert (first[keep] - plain[keep]).abs().mean() < plain[keep].abs().mean()


@pytest.mark.parametrize("absorbed", [True, False], ids=["absorbed", "library_cross_attention"])
def test_teacher_forced_decoder_equals_the_library(make_tiny_model, make_batch, absorbed: bool):
    model = make_tiny_model()
    apply_adaptation(model, AdaptConfig(use_text_lora=True, text_lora_r=4))
    model.eval()
    batch = make_batch(model, batch_size=4)
    losses, grads = {}, {}
    for lean in (True, False):
        speed.install(model, SpeedPaths(lean_decoder=lean, absorbed_cross_attention=absorbed))
        model.zero_grad(set_to_none=True)
        per_sample = model(batch, return_losses=True)
        per_sample.sum().backward()
        losses[lean] = per_sample.detach()
        grads[lean] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_teacher_forced_decoder_is_used_for_mbart_only(make_tiny_model, make_batch, monkeypatch):
    from vqadapt.speed import decoder

    calls = []
    real = decoder.teacher_forced
    monkeypatch.setattr(decoder, "teacher_forced", lambda *a: calls.append(1) or real(*a))
    assert make_tiny_model("mbart").speed_paths.lean_decoder
    assert not make_tiny_model("t5").speed_paths.lean_decoder  # not a family it supports
    for layerdrop, used in ((0.0, True), (0.1, False)):  # LayerDrop skips layers at random
        model = make_tiny_model("mbart", decoder_layerdrop=layerdrop).train()
        calls.clear()
        model(make_batch(model), return_losses=True)
        assert bool(calls) is used


def test_fused_lora_projections_drop_out_each_input_apart(make_tiny_model) -> None:
    from vqadapt.speed.packed import query_key_value

    model = make_tiny_model()
    apply_adaptation(model, AdaptConfig(use_text_lora=True, text_lora_r=4, text_lora_dropout=0.5))
    model.train()
    attention = model.text_encoder_layers()[0].self_attn
    down = attention.q_proj.lora_A["default"].weight
    with torch.no_grad():  # three identical adapters: only their dropout masks can differ
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(attention, name).lora_A["default"].weight.copy_(down)
            getattr(attention, name).lora_B["default"].weight.fill_(1.0)
    hidden = torch.ones(4096, model.text.config.d_model)
    with torch.no_grad():
        fused = query_key_value(attention, hidden).chunk(3, dim=-1)
        one_by_one = [getattr(attention, n)(hidden) for n in ("q_proj", "k_proj", "v_proj")]
        model.eval()
        plain = query_key_value(attention, hidden).chunk(3, dim=-1)
    deltas = [out - base for out, base in zip(fused, plain, strict=True)]
    assert all(d.abs().sum() > 0 for d in deltas)  # dropout changed every projection ...
    assert not torch.allclose(deltas[0], deltas[1], atol=1e-3)  # not one shared mask
    assert not torch.allclose(deltas[1], deltas[2], atol=1e-3)
    # ... by an amount like peft's own modules' (same rate, independent masks)
    for fast, peft_out, base in zip(deltas, one_by_one, plain, strict=True):
        expected = (peft_out - base).abs().mean().item()
        assert fast.abs().mean().item() == pytest.approx(expected, rel=0.1)
