"""Cached and uncached runs compute the same function; a damaged cache file is rebuilt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vqadapt.build import build_data, build_model
from vqadapt.cache import cache_key, cached_or_compute, load_cached, save_cached
from vqadapt.evaluate import mean_loss, predict

STRATEGIES = {
    "baseline": [],
    "unfreeze3": ["--unfreeze_encoder_layers", "3"],
    "text_lora": ["--use_text_lora"],
    "vision_text_lora": ["--use_vision_lora", "--use_text_lora"],
}
# What the cached build is expected to take from the cache, per strategy: where the vision
# tokens come from, and how many text-encoder layers are cached.
CACHED = {
    "baseline": ("vision_features", 12),
    "unfreeze3": ("vision_features", 9),
    "text_lora": ("vision_features", 0),
    "vision_text_lora": ("vision_embeddings", 0),  # the frozen patch embeddings only
}
EVAL_BATCH = 16


def perturb_trainable(model, seed: int = 1, scale: float = 0.2) -> None:
    """The same seeded noise on every trainable weight, so that LoRA (B starts at zero) and the
    decoder matter and greedy decoding produces something other than one token."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def evaluate_built(env, tmp_path: Path, extra: list[str], cache: bool) -> dict:
    config = env.config(tmp_path / "unused", *extra, *([] if cache else ["--no_cache"]))
    backbones = env.backbones()
    model, plan, tokenizer, preprocessing = build_model(config, backbones)
    perturb_trainable(model)
    logs: list[str] = []
    data = build_data(config, model, tokenizer, preprocessing, backbones, log=logs.append)
    n = len(data.encoded["val"])
    collator = data.collators["val"]
    model.eval()
    with torch.no_grad():
        states = []
        for start in range(0, n, EVAL_BATCH):
            batch = collator(list(range(start, min(n, start + EVAL_BATCH))))
            encoded, mask = model.encode(batch)
            states.append(encoded[mask.bool()])
    return {
        "loss": mean_loss(model, collator, n, EVAL_BATCH),
        "predictions": predict(model, collator, n, tokenizer, EVAL_BATCH, 8),
        "states": torch.cat(states),
        "text_prefix_layers": plan.text_cache_layers if data.features.text_prefix else 0,
        "batch_keys": set(collator([0, 1])),
        "logs": logs,
    }


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_cached_and_uncached_agree(vqa_env, tmp_path: Path, name: str) -> None:
    cached = evaluate_built(vqa_env, tmp_path, STRATEGIES[name], cache=True)
    plain = evaluate_built(vqa_env, tmp_path, STRATEGIES[name], cache=False)
    # the two builds really take different paths
    vision_keys = {"vision_features", "vision_embeddings", "pixel_values"}
    assert cached["batch_keys"] & vision_keys == {CACHED[name][0]}
    assert cached["text_prefix_layers"] == CACHED[name][1]
    assert ("text_prefix" in cached["batch_keys"]) == (CACHED[name][1] > 0)
    assert plain["batch_keys"] & vision_keys == {"pixel_values"}
    assert plain["text_prefix_layers"] == 0 and "text_prefix" not in plain["batch_keys"]

    torch.testing.assert_close(cached["states"], plain["states"], rtol=0, atol=1e-5)
    assert cached["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    assert cached["predictions"] == plain["predictions"]
    assert sum(bool(p) for p in cached["predictions"]) >= len(cached["predictions"]) // 2


def test_training_with_and_without_cache_gives_the_same_run(vqa_env, tmp_path: Path) -> None:
    from vqadapt.train import train

    rows = {}
    for cache in (True, False):
        out = tmp_path / f"cache-{cache}"
        extra = ["--max_train_samples", "32", "--batch_size", "8", "--lr", "1e-2"]
        config = vqa_env.config(out, *extra, *([] if cache else ["--no_cache"]))
        train(config, log=lambda _: None)
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        rows[cache] = [json.loads(line) for line in lines]
    # A whole training run: float noise from different padding accumulates over the steps.
    for with_cache, without in zip(rows[True], rows[False], strict=True):
        for key in ("train_loss", "val_loss"):
            assert with_cache[key] == pytest.approx(without[key], abs=1e-4), key


# -- the cache files ------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2, 3])}
    save_cached(path, "key1", tensors)
    loaded = load_cached(path, "key1")
    assert loaded is not None and set(loaded) == {"a", "b"}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert load_cached(path, "key2") is None  # stale: another key
    assert load_cached(tmp_path / "missing.safetensors", "key1") is None


def test_cache_key_depends_on_every_part() -> None:
    base = cache_key(kind="vision", weights="w", images=[("a", 1, 2)])
    assert base == cache_key(images=[("a", 1, 2)], weights="w", kind="vision")
    assert base != cache_key(kind="vision", weights="w2", images=[("a", 1, 2)])
    assert base != cache_key(kind="vision", weights="w", images=[("a", 1, 3)])


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # the header stays valid, the tensor bytes change
        path.write_bytes(data[:-16] + bytes(b ^ 0xFF for b in data[-16:]))
    else:
        path.write_bytes(b"\0" * len(data))


@pytest.mark.parametrize("how", ["truncate", "flip", "zeros"])
def test_a_damaged_tensor_file_is_detected(tmp_path: Path, how: str) -> None:
    path = tmp_path / "x.safetensors"
    save_cached(path, "k", {"flat": torch.randn(10, 4), "lengths": torch.tensor([4, 6])})
    damage(path, how)
    assert load_cached(path, "k") is None
    logs: list[str] = []
    calls = []

    def compute():
        calls.append(1)
        return {"flat": torch.ones(2, 2)}

    rebuilt = cached_or_compute(path, "k", compute, logs.append)
    assert calls and torch.equal(rebuilt["flat"], torch.ones(2, 2))
    assert any("stale or corrupt" in line for line in logs)
    assert torch.equal(load_cached(path, "k")["flat"], torch.ones(2, 2))


def test_corrupted_feature_cache_is_rebuilt(vqa_env, tmp_path: Path, monkeypatch) -> None:
    """Damage the vision and text-prefix caches of a real build: results stay the same."""
    monkeypatch.setenv("VQADAPT_CACHE", str(tmp_path / "cache"))
    extra = ["--unfreeze_encoder_layers", "3"]
    first = evaluate_built(vqa_env, tmp_path, extra, cache=True)
    files = sorted((tmp_path / "cache" / "features").glob("*.safetensors"))
    kinds = sorted(path.name.split("-")[0] for path in files)
    assert kinds == ["text", "text", "text", "vision"]  # train, val, test prefixes + images
    for path, how in zip(files, ["truncate", "flip", "zeros", "flip"], strict=True):
        key = path.stem.split("-", 1)[1]
        assert load_cached(path, key) is not None
        damage(path, how)
        assert load_cached(path, key) is None, (path.name, how)
    second = evaluate_built(vqa_env, tmp_path, extra, cache=True)
    rebuilt = [line for line in second["logs"] if "stale or corrupt: rebuilding" in line]
    assert len(rebuilt) == 4
    assert second["loss"] == first["loss"]
    assert second["predictions"] == first["predictions"]
    assert torch.equal(second["states"], first["states"])
    for path in files:
        assert load_cached(path, path.stem.split("-", 1)[1]) is not None
    third = evaluate_built(vqa_env, tmp_path, extra, cache=True)
    assert sum("cache hit" in line for line in third["logs"]) == 4
    assert os.environ["VQADAPT_CACHE"] == str(tmp_path / "cache")
