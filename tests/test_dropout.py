"""The fast CPU dropout: the right drop rate and scale, independent masks, seeded, swapped in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vqadapt import speed
from vqadapt.adapt import apply_adaptation
from vqadapt.config import AdaptConfig
from vqadapt.speed import SpeedPaths
from vqadapt.speed import dropout as fast


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_scale_and_mean(p: float) -> None:
    torch.manual_seed(0)
    n = 1_000_000
    x = torch.ones(n)
    out = fast.dropout(x, p)
    dropped = (out == 0).float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 5 * sigma
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
    assert out.mean().item() == pytest.approx(1.0, abs=5 * sigma / (1 - p))


def test_masks_are_independent_across_positions_and_calls() -> None:
    torch.manual_seed(0)
    p, n = 0.3, 400_000
    first = fast.keep_mask((n,), p).float()
    second = fast.keep_mask((n,), p).float()
    assert not torch.equal(first, second)
    sigma = 1 / n**0.5
    # Neighbours and the next call's mask are uncorrelated.
    for a, b in ((first[:-1], first[1:]), (first, second), (first[::2], first[1::2])):
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 * sigma * 2**0.5


def test_seeded_like_torch() -> None:
    torch.manual_seed(7)
    a = fast.keep_mask((1000,), 0.1)
    torch.manual_seed(7)
    b = fast.keep_mask((1000,), 0.1)
    torch.manual_seed(8)
    c = fast.keep_mask((1000,), 0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_is_the_mask_times_the_scale() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    out = fast.dropout(x, 0.2)
    out.sum().backward()
    kept = out.detach() != 0
    expected = kept.float() / 0.8
    torch.testing.assert_close(x.grad, expected)


def test_identity_when_off() -> None:
    x = torch.randn(10)
    assert fast.dropout(x, 0.1, training=False) is x
    assert fast.dropout(x, 0.0) is x
    module = fast.Dropout(0.5).eval()
    assert module(x) is x


def test_lora_dropouts_are_swapped_in(make_tiny_model, make_batch) -> None:
    model = make_tiny_model()
    apply_adaptation(
        model, AdaptConfig(use_text_lora=True, use_vision_lora=True, text_lora_dropout=0.05)
    )
    speed.install(model, SpeedPaths.for_device("cpu"))  # after the adaptation, as build_model
    lora_dropouts = [m for name, m in model.named_modules() if ".lora_dropout." in name]
    assert lora_dropouts and all(type(m) is fast.Dropout for m in lora_dropouts)
    assert {m.p for m in lora_dropouts} == {0.05}
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert type(model.projector.dropout) is fast.Dropout
    model.train()
    batch = make_batch(model)
    with torch.no_grad():
        assert not torch.equal(model(batch), model(batch))  # dropout is on
        model.eval()
        assert torch.equal(model(batch), model(batch))


def test_fast_dropout_is_a_cpu_profile_path_only(make_tiny_model) -> None:
    model = make_tiny_model(speed="cuda")
    assert not any(type(m) is fast.Dropout for m in model.modules())
    speed.install(model, SpeedPaths.for_device("cpu"))
    assert type(model.projector.dropout) is fast.Dropout
    speed.install(model, SpeedPaths.library())  # and back
    assert not any(type(m) is fast.Dropout for m in model.modules())
