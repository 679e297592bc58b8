"""The tiny backbones are standard Hugging Face folders, and their tokenizer keeps Vietnamese intact."""

from __future__ import annotations

import json
import unicodedata

import pytest
from transformers import AutoImageProcessor, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

from vqadapt.backbones import load_image_preprocessing, text_layout, vision_layout

SENTENCES = [
    "màu của chiếc bình là gì",
    "có bao nhiêu hình tròn màu xanh lá",
    "bàn chải đánh răng",
    "hình tam giác màu vàng nằm ở đâu",
]


def test_backbones_load_with_plain_from_pretrained(vqa_env) -> None:
    text = AutoModelForSeq2SeqLM.from_pretrained(vqa_env.text)
    vision = AutoModel.from_pretrained(vqa_env.vision)
    assert type(text).__name__ == "MBartForConditionalGeneration"
    assert type(vision).__name__ == "Dinov2Model"
    assert text_layout(text).num_layers == 12
    assert text_layout(text).projections == ("q_proj", "k_proj", "v_proj")
    assert vision_layout(vision).projections == ("q_proj", "k_proj", "v_proj")
    processor = AutoImageProcessor.from_pretrained(vqa_env.vision)
    prep = load_image_preprocessing(str(vqa_env.vision))
    assert prep.crop == vision.config.image_size == 112
    assert list(prep.mean) == list(processor.image_mean)
    for folder in (vqa_env.text, vqa_env.vision):
        record = json.loads((folder / "vqadapt_pretraining.json").read_text(encoding="utf-8"))
        assert record["steps"] > 0 and record["loss_last"] < record["loss_first"]


@pytest.mark.parametrize("sentence", SENTENCES)
def test_tokenizer_round_trips_vietnamese(vqa_env, sentence: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(vqa_env.text)
    ids = tokenizer(sentence)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence
    decomposed = unicodedata.normalize("NFD", sentence)
    assert (
        tokenizer.decode(tokenizer(decomposed)["input_ids"], skip_special_tokens=True) == sentence
    )


def _one_shape(colour: str, shape: str = "hình tròn"):
    """A normalised image of one shape on the benchmark's grey background."""
    import random

    import numpy as np
    import torch
    from PIL import ImageDraw

    from vqadapt.data.synth import COLOUR_RGB, ShapeObject, _background, _draw
    from vqadapt.tiny import IMAGE_MEAN, IMAGE_STD

    image = _background(random.Random(3), 112)
    _draw(
        ImageDraw.Draw(image),
        ShapeObject(shape, colour, 0.4, 0.5, 0.13, (0, 0, 0, 0)),
        112,
        COLOUR_RGB[colour],
    )
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    return (pixels - mean) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)


def test_blind_vision_tower_confuses_twin_colours(tmp_path) -> None:
    """The same shape in every colour of the palette: identical features from the frozen tower
    for twin colours (``data.synth.TWINS``), distinct ones for colours it may see apart and for
    shapes; its patch embeddings still differ in the reserved dimensions (what vision LoRA can
    read), and the build keeps that structure."""
    import torch
    from transformers import Dinov2Model

    from vqadapt.blindspots import RESERVED_DIMS
    from vqadapt.data.synth import COLOURS, SEEN_COLOUR, TWINS
    from vqadapt.tiny import build_vision_tower

    build_vision_tower(tmp_path / "vision", steps=3, blind_to_colour=True)
    model = Dinov2Model.from_pretrained(tmp_path / "vision").eval()
    with torch.no_grad():
        features = {c: model(pixel_values=_one_shape(c)).last_hidden_state for c in COLOURS}
        embedded = {c: model.embeddings(_one_shape(c)) for c in COLOURS}
        square = model(pixel_values=_one_shape(COLOURS[0], "hình vuông")).last_hidden_state
    for colour, twin in TWINS.items():
        assert torch.allclose(features[colour], features[twin], atol=1e-4)
    for a in COLOURS:
        for b in COLOURS:
            if SEEN_COLOUR[a] != SEEN_COLOUR[b]:
                assert (features[a] - features[b]).abs().max() > 0.1, (a, b)
    assert (features[COLOURS[0]] - square).abs().max() > 0.1  # shapes still seen
    yellow, purple = (embedded[c][0, 1:] for c in ("vàng", "tím"))
    reserved = yellow[:, -RESERVED_DIMS:], purple[:, -RESERVED_DIMS:]
    assert (reserved[0] - reserved[1]).abs().max() > 0.1  # the twin reaches the input
    assert torch.allclose(yellow[:, :-RESERVED_DIMS], purple[:, :-RESERVED_DIMS], atol=1e-4)
    assert reserved[0].sum(dim=1).abs().max() < 1e-4  # balanced: layer norms cannot tell


def test_blind_text_encoder_does_not_see_the_instruction_and_lora_can_learn_it(tmp_path) -> None:
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from vqadapt.data.synth import pretraining_texts
    from vqadapt.tiny import build_text_tower

    build_text_tower(tmp_path / "text", pretraining_texts(), steps=3, blind_to_words=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "text")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "text").eval()
    encoder = model.get_encoder()

    def encode(question: str) -> torch.Tensor:
        with torch.no_grad():
            return encoder(**tokenizer(question, return_tensors="pt")).last_hidden_state

    count, name = encode("hãy đếm số hình trong ảnh"), encode("hãy gọi tên hình trong ảnh")
    assert torch.allclose(count, name, atol=1e-5)
    assert torch.allclose(
        encode("hãy đếm số vật trong ảnh"), encode("hãy gọi tên vật trong ảnh"), atol=1e-5
    )
    red = encode("hình màu đỏ là hình gì")
    assert (red - encode("hình màu vàng là hình gì")).abs().max() > 0.1  # colours still seen
    circle = encode("có hình tròn nào không")  # shapes are no longer blind
    assert (circle - encode("có hình vuông nào không")).abs().max() > 0.1

    # An adapted layer can read the instruction: LoRA's A matrix gets a gradient from it.
    from vqadapt.adapt import apply_adaptation
    from vqadapt.config import AdaptConfig
    from vqadapt.model import VQAModel

    vqa = VQAModel(None, model)
    apply_adaptation(vqa, AdaptConfig(use_text_lora=True, text_lora_r=4), blind=True)
    vqa.train()
    for name, param in vqa.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # B starts at zero: open the path
    ids = tokenizer(
        ["hãy đếm số hình trong ảnh", "hãy gọi tên hình trong ảnh"], return_tensors="pt"
    )
    states = vqa.text.get_encoder()(**ids).last_hidden_state
    assert (states[0] - states[1]).abs().max() > 1e-3
