"""The packed text encoder (real tokens only) against transformers' padded one."""

from __future__ import annotations

import pytest
import torch

from vqadapt.adapt import apply_adaptation
from vqadapt.config import AdaptConfig
from vqadapt.packed import Packing


def library_encoder(model, batch) -> torch.Tensor:
    return model.text_encoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state


def packed_encoder(model, batch) -> torch.Tensor:
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
