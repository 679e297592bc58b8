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
