"""VQAModel: untied embeddings, the text encoder in two pieces, train/eval modes, blind model."""

from __future__ import annotations

import pytest
import torch

from vqadapt.adapt import apply_adaptation
from vqadapt.config import AdaptConfig
from vqadapt.model import VQAModel


def encoder_output(model: VQAModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The text encoder run the ordinary way (transformers' forward)."""
    return model.text_encoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state


@pytest.mark.parametrize("family", ["mbart", "t5"])
def test_decoder_embedding_is_untied_from_the_encoder(make_tiny_model, family: str) -> None:
    model = make_tiny_model(family)
    text = model.text
    encoder_embed = text.get_encoder().get_input_embeddings().weight
    decoder_embed = text.get_decoder().get_input_embeddings().weight
    assert encoder_embed is not decoder_embed
    assert text.get_output_embeddings().weight is decoder_embed  # LM head stays tied to it
    assert torch.equal(encoder_embed, decoder_embed)  # a copy, same values
    assert text.config.tie_word_embeddings is False
    # transformers re-ties from its tables on tie_weights(): it must not undo the split.
    text.tie_weights()
    assert text.get_encoder().get_input_embeddings().weight is encoder_embed
    assert text.get_decoder().get_input_embeddings().weight is decoder_embed
    assert text.get_output_embeddings().weight is decoder_embed
    before = encoder_embed.detach().clone()
    with torch.no_grad():
        decoder_embed.add_(1.0)
    assert torch.equal(encoder_embed, before)


def test_untying_an_untied_model_changes_nothing(make_tiny_model) -> None:
    from vqadapt.model import untie_decoder_embeddings

    model = make_tiny_model()
    params = {name: p for name, p in model.text.named_parameters()}
    untie_decoder_embeddings(model.text)
    assert {name: p for name, p in model.text.named_parameters()} == params


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("mbart", {}), ("mbart", {"scale_embedding": True}), ("t5", {})],
    ids=["mbart", "mbart-scaled", "t5"],
)
def test_prefix_then_suffix_equals_the_whole_encoder(
    make_tiny_model, make_batch, family: str, overrides: dict
) -> None:
    model = make_tiny_model(family, **overrides).eval()
    batch = make_batch(model, batch_size=4)
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # padding is part of the test
    with torch.no_grad():
        full = encoder_output(model, batch)
        layers = model.text_layout.num_layers
        for cached in range(layers + 1):
            model.text_cache_layers = cached
            prefix = model.encode_text_prefix(batch["input_ids"], mask)
            out = model.encode_text_suffix(prefix, mask)
            # Outputs at padded positions are never read (the decoder masks them).
            keep = mask.bool()
            torch.testing.assert_close(
                out[keep], full[keep], rtol=0, atol=1e-5, msg=f"{cached} layers"
            )
            assert prefix.shape == (*batch["input_ids"].shape, model.text.config.d_model)


def test_a_cached_prefix_with_other_padding_gives_the_same_states(make_tiny_model, make_batch):
    """The cache stores each question's prefix unpadded; the collator re-pads it with zeros."""
    model = make_tiny_model().eval()
    model.text_cache_layers = 7
    batch = make_batch(model, batch_size=4)
    mask = batch["attention_mask"]
    with torch.no_grad():
        prefix = model.encode_text_prefix(batch["input_ids"], mask)
        full = model.encode_text_suffix(prefix, mask)
        lengths = mask.sum(1)
        zero_padded = torch.zeros_like(prefix)
        for row, length in enumerate(lengths):
            zero_padded[row, :length] = prefix[row, :length]
        out = model.encode_text_suffix(zero_padded, mask)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], full[keep], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("adapt", "encoder_training", "vision_training"),
    [
        (AdaptConfig(), [False] * 12, False),
        (AdaptConfig(unfreeze_encoder_layers=3), [False] * 9 + [True] * 3, False),
        (AdaptConfig(use_text_lora=True), [True] * 12, False),
        (AdaptConfig(use_vision_lora=True), [False] * 12, True),
    ],
    ids=["frozen", "unfreeze3", "text_lora", "vision_lora"],
)
def test_train_keeps_frozen_parts_in_eval_mode(
    make_tiny_model, adapt: AdaptConfig, encoder_training: list[bool], vision_training: bool
) -> None:
    model = make_tiny_model()
    apply_adaptation(model, adapt)
    model.train()
    assert [layer.training for layer in model.text_encoder_layers()] == encoder_training
    assert all(m.training == vision_training for m in model.vision.encoder.modules())
    assert not any(m.training for m in model.vision.embeddings.modules())  # never trained
    assert model.projector.training
    assert model.text.get_decoder().training
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()  # and back
    assert [layer.training for layer in model.text_encoder_layers()] == encoder_training


def test_frozen_prefix_has_no_dropout_in_train_mode(make_tiny_model, make_batch) -> None:
    model = make_tiny_model()
    assert model.text.config.dropout > 0
    apply_adaptation(model, AdaptConfig(unfreeze_encoder_layers=3))
    model.train()
    batch = make_batch(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        first = model.encode_text_prefix(ids, mask)
        assert torch.equal(first, model.encode_text_prefix(ids, mask))
        # the unfrozen suffix does use dropout (so the check above can fail)
        suffix = model.encode_text_suffix(first, mask)
        assert not torch.equal(suffix, model.encode_text_suffix(first, mask))
        features = model.encode_image(batch["pixel_values"])
        assert torch.equal(features, model.encode_image(batch["pixel_values"]))


def test_frozen_t5_encoder_has_no_dropout_in_train_mode(make_tiny_model, make_batch) -> None:
    model = make_tiny_model("t5", blind=True)
    assert model.text.config.dropout_rate > 0
    apply_adaptation(model, AdaptConfig())  # the whole encoder is frozen
    model.train()
    batch = make_batch(model)
    with torch.no_grad():
        first = model.encode_text_prefix(batch["input_ids"], batch["attention_mask"])
        again = model.encode_text_prefix(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(first, again)


def test_vision_tower_in_two_pieces_equals_the_whole(make_tiny_model, make_batch) -> None:
    model = make_tiny_model().eval()
    pixels = make_batch(model)["pixel_values"]
    with torch.no_grad():
        whole = model.vision(pixel_values=pixels).last_hidden_state
        from_pixels = model.encode_image(pixels)
        from_embeddings = model.encode_image(embeddings=model.embed_image(pixels))
    torch.testing.assert_close(from_pixels, whole, rtol=0, atol=0)
    torch.testing.assert_close(from_embeddings, whole, rtol=0, atol=0)


def test_fusion_concatenates_text_and_image_tokens(make_tiny_model, make_batch) -> None:
    model = make_tiny_model().eval()
    batch = make_batch(model)
    with torch.no_grad():
        states, mask = model.encode(batch)
        image_tokens = 1 + (28 // 14) ** 2  # CLS + patches
        length = batch["input_ids"].shape[1]
        keys = -(-(length + image_tokens) // 16) * 16  # masked zeros up to a multiple of 16
        assert states.shape == (3, keys, model.text.config.d_model)
        assert torch.equal(mask[:, :length], batch["attention_mask"])
        assert (mask[:, length : length + image_tokens] == 1).all()
        assert (mask[:, length + image_tokens :] == 0).all()
        assert (states[:, length + image_tokens :] == 0).all()
        # cached vision features give the same states as pixels
        features = model.encode_image(batch["pixel_values"])
        cached = {k: v for k, v in batch.items() if k != "pixel_values"}
        cached["vision_features"] = features
        torch.testing.assert_close(model.encode(cached)[0], states, rtol=0, atol=0)


def test_dropout_setting_reaches_the_decoder_only(make_tiny_model) -> None:
    model = make_tiny_model(dropout=0.3)
    decoder = model.text.get_decoder()
    assert decoder.dropout == 0.3
    assert all(layer.dropout == 0.3 for layer in decoder.layers)
    assert all(
        layer.self_attn.dropout == model.text.config.attention_dropout for layer in decoder.layers
    )
    assert all(layer.dropout == model.text.config.dropout for layer in model.text_encoder_layers())
    assert model.projector.dropout.p == 0.3


def test_blind_model(make_tiny_model, make_batch) -> None:
    model = make_tiny_model(blind=True)
    assert model.vision is None and model.projector is None
    plan = apply_adaptation(model, AdaptConfig(unfreeze_encoder_layers=2), blind=True)
    assert plan.per_tower["vision"] == {"trainable": 0, "total": 0}
    assert plan.per_tower["projector"] == {"trainable": 0, "total": 0}
    assert "blind (question only)" in plan.strategy
    assert not [row for row in plan.layers if row.tower == "vision"]
    batch = make_batch(model)
    assert "pixel_values" not in batch
    model.train()
    logits = model(batch)
    assert logits.shape == (3, 4, model.text.config.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    loss.backward()
    model.eval()
    states, mask = model.encode(batch)
    assert states.shape[1] == batch["input_ids"].shape[1]
    assert torch.equal(mask, batch["attention_mask"])
    generated = model.generate(batch, max_new_tokens=3)
    assert generated.shape[0] == 3 and generated.shape[1] <= 4
    assert (generated[:, 0] == model.decoder_start_token_id).all()


@pytest.mark.parametrize(("family", "start"), [("mbart", 2), ("t5", 0)])
def test_decoder_start_token(make_tiny_model, family: str, start: int) -> None:
    assert make_tiny_model(family).decoder_start_token_id == start


def test_tiny_vision_config_sizes_are_the_built_sizes() -> None:
    from transformers import Dinov2Config, Dinov2Model

    from vqadapt.tiny import TINY_VISION

    model = Dinov2Model(Dinov2Config(**TINY_VISION))
    width = TINY_VISION["hidden_size"] * TINY_VISION["mlp_ratio"]
    assert model.encoder.layer[0].mlp.fc1.out_features == width == 256
