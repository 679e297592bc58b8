"""The absorbed cross-attention gives the library's outputs and gradients (cross_attention.py)."""

from __future__ import annotations

import pytest
import torch

from vqadapt import speed
from vqadapt.losses import token_losses
from vqadapt.speed import SpeedPaths, cross_attention


@pytest.fixture
def count_absorbed(monkeypatch):
    calls = []
    real = cross_attention._absorbed_forward

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cross_attention, "_absorbed_forward", counted)
    return calls


def _loss_and_grads(model, batch, enabled: bool, monkeypatch):
    cross_attention.install(model.text, "encoder_attn", enabled)
    model.zero_grad(set_to_none=True)
    logits = model(batch)
    token_losses(logits, batch["labels"]).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("blind", [False, True])
def test_same_logits_and_gradients_as_the_library(
    make_tiny_model, make_batch, monkeypatch, count_absorbed, blind
):
    model = make_tiny_model(blind=blind, dropout=0.0)
    model.eval()  # no dropout anywhere (the encoders' own dropout too); gradients still flow
    batch = make_batch(model, batch_size=4)  # questions padded to different lengths
    logits, grads = _loss_and_grads(model, batch, True, monkeypatch)
    assert len(count_absorbed) == model.text.config.decoder_layers  # the new path did run
    reference, reference_grads = _loss_and_grads(model, batch, False, monkeypatch)
    assert len(count_absorbed) == model.text.config.decoder_layers  # and the library's here
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        if name.endswith("encoder_attn.k_proj.bias"):
            continue  # its gradient is zero in exact arithmetic: both sides hold rounding noise
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_attention_dropout_keeps_the_value_bias_exact(make_tiny_model, make_batch):
    """With dropout on P, rows no longer sum to 1: the bias term uses the dropped rows' sums."""
    model = make_tiny_model(dropout=0.0)
    module = model.text.get_decoder().layers[0].encoder_attn
    module.dropout = 0.5
    module.train()
    hidden = torch.randn(2, 3, 16)
    states = torch.randn(2, 9, 16)
    torch.manual_seed(0)
    out, probs = cross_attention._absorbed_forward(module, hidden, states, None)
    value = module.v_proj(states).view(2, 9, 2, 8).transpose(1, 2)
    expected = torch.matmul(probs, value).transpose(1, 2).reshape(2, 3, 16)
    torch.testing.assert_close(out, module.out_proj(expected), rtol=1e-5, atol=1e-6)


def test_generation_keeps_the_library_path(make_tiny_model, make_batch, count_absorbed):
    model = make_tiny_model(dropout=0.0).eval()
    batch = make_batch(model)
    generated = model.generate(batch, max_new_tokens=4, num_beams=2)
    assert count_absorbed == []  # generation computes the cross key/value cache once
    assert generated.shape[0] == 3


def test_other_families_keep_their_attention(make_tiny_model):
    model = make_tiny_model(family="t5", speed="library")
    installed = speed.install(model, SpeedPaths(absorbed_cross_attention=True))
    assert not installed.absorbed_cross_attention  # T5 does not support it
    assert not any(isinstance(m, cross_attention.AbsorbedCrossAttention) for m in model.modules())


def test_install_swaps_the_class_and_back_keeping_parameters(make_tiny_model):
    model = make_tiny_model(speed="library")
    before = dict(model.named_parameters())
    layers = model.text.get_decoder().layers
    assert cross_attention.install(model.text, "encoder_attn") == len(layers)
    assert all(
        isinstance(layer.encoder_attn, cross_attention.AbsorbedCrossAttention) for layer in layers
    )
    assert dict(model.named_parameters()) == before  # same names, same tensors
    assert cross_attention.install(model.text, "encoder_attn") == 0  # already there
    assert cross_attention.install(model.text, "encoder_attn", enabled=False) == len(layers)
    assert all(type(layer.encoder_attn).__name__ == "MBartAttention" for layer in layers)


def test_long_answers_fall_back_to_projecting(make_tiny_model, count_absorbed):
    """The absorbed form pays per query and head: with H T > d the projection is cheaper."""
    model = make_tiny_model(dropout=0.0).eval()
    module = model.text.get_decoder().layers[0].encoder_attn
    with torch.no_grad():
        module(torch.randn(1, 20, 16), key_value_states=torch.randn(1, 9, 16))  # 2 x 20 > 16
    assert count_absorbed == []


@pytest.mark.parametrize("family", ["mbart", "t5"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_losses_from_labelled_positions_only_equal_the_full_logits(
    make_tiny_model, make_batch, family, label_smoothing
):
    """``return_losses`` runs the LM head on labelled positions only (BART layout): the same
    per-sample losses and gradients as the cross-entropy of the full logits."""
    model = make_tiny_model(family=family, dropout=0.0).eval()
    batch = make_batch(model, batch_size=4)
    assert (batch["labels"] == -100).any()  # padded answers: positions the head skips
    full = token_losses(model(batch), batch["labels"], label_smoothing)
    full.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    packed = model(batch, return_losses=True, label_smoothing=label_smoothing)
    packed.sum().backward()
    torch.testing.assert_close(packed, full, rtol=1e-5, atol=1e-6)
    for name, grad in expected.items():
        if name.endswith("encoder_attn.k_proj.bias"):
            continue  # zero in exact arithmetic (see above)
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-7)
