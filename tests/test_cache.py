"""Cached and uncached runs compute the same function; caches are shared, repaired, refused.

The cache stores the frozen towers' outputs in 16 bits (fp16 here: the towers compute in fp32
on the CPU), so the cached path reads rounded features. The uncached reference rounds at the
same point (``rounded_frozen_outputs``: the frozen outputs pass through fp16 in both paths) and
must then agree as tightly as before; the unrounded uncached path is compared with a tolerance
derived from fp16's precision (``test_fp16_storage_error_is_what_fp16_allows``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

from vqadapt import shards
from vqadapt.build import build_data, build_model
from vqadapt.cache import cache_key, storage_dtype
from vqadapt.errors import VQAConfigError
from vqadapt.evaluate import mean_loss, predict
from vqadapt.model import VQAModel
from vqadapt.runtime import Runtime

CPU = torch.device("cpu")
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


@contextlib.contextmanager
def rounded_frozen_outputs(dtype: torch.dtype = torch.float16):
    """Round what the cache stores, where it is computed, in every path: the frozen vision
    tokens (frozen tower), the frozen patch embeddings (vision LoRA) and the frozen text
    prefix (when layers are cached). Rounding twice is rounding once, so the cached path reads
    the same values."""
    encode_image, embed_image = VQAModel.encode_image, VQAModel.embed_image
    encode_text_prefix = VQAModel.encode_text_prefix

    def rounded(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).to(x.dtype)

    def image(self, pixel_values=None, embeddings=None):
        cached_embeddings = self.vision_splittable and self.vision_embeddings_frozen
        if embeddings is None and not self.vision_frozen and cached_embeddings:
            # the uncached path runs the embeddings inside the tower: split it where the cache
            # does, so that the embeddings are rounded there too
            pixel_values, embeddings = None, self.embed_image(pixel_values)
        out = encode_image(self, pixel_values, embeddings=embeddings)
        return rounded(out) if self.vision_frozen else out

    def embed(self, pixel_values):
        out = embed_image(self, pixel_values)
        return out if self.vision_frozen else rounded(out)

    def prefix(self, input_ids, attention_mask):
        out = encode_text_prefix(self, input_ids, attention_mask)
        return rounded(out) if self.text_cache_layers > 0 else out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VQAModel, "encode_image", image)
        patch.setattr(VQAModel, "embed_image", embed)
        patch.setattr(VQAModel, "encode_text_prefix", prefix)
        yield


def perturb_trainable(model, seed: int = 1, scale: float = 0.2) -> None:
    """The same seeded noise on every trainable weight, so that LoRA (B starts at zero) and the
    decoder matter and greedy decoding produces something other than one token."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def evaluate_built(env, tmp_path: Path, extra: list[str], cache: bool, **build) -> dict:
    config = env.config(tmp_path / "unused", *extra, *([] if cache else ["--no_cache"]))
    backbones = env.backbones()
    model, plan, tokenizer, preprocessing = build_model(config, backbones)
    perturb_trainable(model)
    logs: list[str] = []
    data = build_data(config, model, tokenizer, preprocessing, backbones, log=logs.append, **build)
    n = len(data.encoded["val"])
    collator = data.collators["val"]
    model.eval()
    with torch.no_grad():
        states = []
        chunks = [
            list(range(start, min(n, start + EVAL_BATCH))) for start in range(0, n, EVAL_BATCH)
        ]
        for batch in data.loader("val", chunks):
            encoded, mask = model.encode(batch)
            states.append(encoded[mask.bool()])
    return {
        "loss": mean_loss(model, collator, n, EVAL_BATCH),
        "predictions": predict(model, collator, n, tokenizer, EVAL_BATCH, 8),
        "states": torch.cat(states),
        "text_prefix_layers": plan.text_cache_layers if data.features.text_prefix else 0,
        "batch_keys": set(collator([0, 1])),
        "logs": logs,
        "data": data,
        "model": model,
    }


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_cached_and_uncached_agree(vqa_env, tmp_path: Path, name: str) -> None:
    cached = evaluate_built(vqa_env, tmp_path, STRATEGIES[name], cache=True)
    with rounded_frozen_outputs():
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


# fp16 keeps 11 significant bits: rounding moves a value by at most half a unit in the last
# place, 2^-11 of it (plus 2^-25 below fp16's normal range).
FP16_HALF_ULP = 2.0**-11


def within_fp16_rounding(stored: torch.Tensor, exact: torch.Tensor) -> bool:
    """``stored`` is ``exact`` rounded to fp16, allowing the float noise of another batch
    composition (1e-6) on top."""
    return bool(((stored - exact).abs() <= FP16_HALF_ULP * exact.abs() + 2.0**-25 + 1e-6).all())


@pytest.mark.parametrize("name", ["baseline", "vision_text_lora"])
def test_fp16_storage_error_is_what_fp16_allows(vqa_env, tmp_path: Path, name: str) -> None:
    """Against the unrounded uncached path: every cached row is the fp32 tower output rounded
    once to fp16, and what that rounding does downstream is small. Measured on this set: encoder
    states differ by at most 4.4e-3 (1.5e-2 with vision LoRA; mean 6e-4 / 1.2e-3), the mean
    loss by 1.4e-4 (2.2e-4), and all 32 greedy answers are the same."""
    cached = evaluate_built(vqa_env, tmp_path, STRATEGIES[name], cache=True)
    plain = evaluate_built(vqa_env, tmp_path, STRATEGIES[name], cache=False)
    data, model = cached["data"], cached["model"]
    indices = list(range(16))
    with torch.no_grad():
        pixels = data.collators["val"].images.crops(
            [data.encoded["val"].image_slots[i] for i in indices]
        )
        pixel_values = data.collators["val"].preprocessing.normalise(pixels)
        if name == "baseline":
            exact = model.encode_image(pixel_values)
            stored = data.features.vision_features.read_padded(
                [data.encoded["val"].image_slots[i] for i in indices]
            )[:, 0]
            batch = data.collators["val"](indices)
            prefix = model.encode_text_prefix(batch["input_ids"], batch["attention_mask"])
            stored_prefix = data.features.text_prefix["val"].read_padded(indices)
            assert within_fp16_rounding(stored_prefix.float(), prefix)
        else:
            exact = model.embed_image(pixel_values)
            stored = data.features.vision_embeddings.read_padded(
                [data.encoded["val"].image_slots[i] for i in indices]
            )[:, 0]
    assert stored.dtype == torch.float16
    assert within_fp16_rounding(stored.float(), exact)
    assert not torch.equal(stored.float(), exact)  # it did round
    diff = (cached["states"] - plain["states"]).abs()
    assert diff.max() < 0.05 and diff.mean() < 5e-3
    assert cached["loss"] == pytest.approx(plain["loss"], abs=1e-3)
    same = [a == b for a, b in zip(cached["predictions"], plain["predictions"], strict=True)]
    assert sum(same) >= 0.9 * len(same)


def test_training_with_and_without_cache_gives_the_same_run(vqa_env, tmp_path: Path) -> None:
    from vqadapt.train import train

    rows = {}
    for cache in (True, False):
        out = tmp_path / f"cache-{cache}"
        extra = ["--max_train_samples", "32", "--batch_size", "8", "--lr", "1e-2"]
        config = vqa_env.config(out, *extra, *([] if cache else ["--no_cache"]))
        with rounded_frozen_outputs():
            train(config, log=lambda _: None)
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        rows[cache] = [json.loads(line) for line in lines]
    # A whole training run: float noise from different padding accumulates over the steps.
    for with_cache, without in zip(rows[True], rows[False], strict=True):
        for key in ("train_loss", "val_loss"):
            assert with_cache[key] == pytest.approx(without[key], abs=1e-4), key


def test_cache_key_depends_on_every_part() -> None:
    base = cache_key(kind="vision", weights="w", images=[("a", 1, 2)])
    assert base == cache_key(images=[("a", 1, 2)], weights="w", kind="vision")
    assert base != cache_key(kind="vision", weights="w2", images=[("a", 1, 2)])
    assert base != cache_key(kind="vision", weights="w", images=[("a", 1, 3)])


def test_storage_follows_the_compute_dtype() -> None:
    assert storage_dtype(None) == torch.float16  # fp32 towers: fp16's finer mantissa
    assert storage_dtype(torch.float16) == torch.float16
    assert storage_dtype(torch.bfloat16) == torch.bfloat16  # bf16 outputs stored losslessly


def feature_folders(root: Path) -> dict[str, Path]:
    return {path.name.split("-")[0]: path for path in sorted((root / "features").iterdir())}


def test_caches_are_sharded_compact_and_shared(vqa_env, tmp_path: Path, monkeypatch) -> None:
    """Two builds of the same frozen towers share one cache; another compute dtype or device
    type is another cache."""
    monkeypatch.setenv("VQADAPT_CACHE", str(tmp_path / "cache"))
    first = evaluate_built(
        vqa_env, tmp_path, ["--unfreeze_encoder_layers", "3"], cache=True, shard_items=16
    )
    folders = sorted((tmp_path / "cache" / "features").iterdir())
    assert [f.name.split("-")[0] for f in folders] == ["text", "text", "text", "vision"]
    for reader in first["data"].features.readers():
        spec = reader.spec
        assert spec.dtype == torch.float16 and spec.items_per_shard == 16
        files = sorted(spec.folder.glob("shard-*.safetensors"))
        assert len(files) == spec.n_shards == -(-spec.n_items // 16)
        assert sum(f.stat().st_size for f in files) <= 2 * spec.values + spec.n_shards * 4096
    second = evaluate_built(
        vqa_env, tmp_path, ["--unfreeze_encoder_layers", "3"], cache=True, shard_items=16
    )
    assert not any("to build" in line for line in second["logs"])
    assert sum("all on disk" in line for line in second["logs"]) == 4
    assert torch.equal(second["states"], first["states"])
    assert sorted((tmp_path / "cache" / "features").iterdir()) == folders
    bf16 = evaluate_built(
        vqa_env, tmp_path, [], cache=True, shard_items=16, runtime=Runtime(CPU, "bf16")
    )
    assert bf16["data"].features.vision_features.spec.dtype == torch.bfloat16
    assert len(list((tmp_path / "cache" / "features").iterdir())) > len(folders)


def test_a_corrupt_shard_of_a_real_build_is_rebuilt_alone(
    vqa_env, tmp_path: Path, monkeypatch
) -> None:
    """Damage one shard of the vision cache and one of a text-prefix cache: only those two
    are rebuilt, and the results stay bit-identical."""
    monkeypatch.setenv("VQADAPT_CACHE", str(tmp_path / "cache"))
    extra = ["--unfreeze_encoder_layers", "3"]
    first = evaluate_built(vqa_env, tmp_path, extra, cache=True, shard_items=16)
    features = first["data"].features
    vision, prefix = features.vision_features.spec, features.text_prefix["val"].spec
    targets = [(vision, 2), (prefix, 1)]
    stamps = {
        (s.folder, i): s.path(i).stat().st_mtime_ns
        for s in (vision, prefix)
        for i in range(s.n_shards)
    }
    for spec, shard in targets:
        data = spec.path(shard).read_bytes()
        spec.path(shard).write_bytes(data[:-16] + bytes(b ^ 0xFF for b in data[-16:]))
        assert shards.present(spec, shard) and not shards.verify(spec, shard)
    second = evaluate_built(vqa_env, tmp_path, extra, cache=True, shard_items=16)
    assert any(line.endswith("built shards 2") and "vision" in line for line in second["logs"])
    assert any(line.endswith("built shards 1") and "(val)" in line for line in second["logs"])
    for (folder, shard), stamp in stamps.items():
        spec = vision if folder == vision.folder else prefix
        changed = spec.path(shard).stat().st_mtime_ns != stamp
        assert changed == ((spec, shard) in targets), (folder.name, shard)
    assert second["loss"] == first["loss"]
    assert second["predictions"] == first["predictions"]
    assert torch.equal(second["states"], first["states"])
    assert os.environ["VQADAPT_CACHE"] == str(tmp_path / "cache")


def test_a_disk_too_small_is_refused_before_the_towers_run(
    vqa_env, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("VQADAPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shards, "free_bytes", lambda folder: 100_000)
    config = vqa_env.config(tmp_path / "unused")
    model, _, tokenizer, preprocessing = build_model(config, vqa_env.backbones())
    calls: list[int] = []
    model.vision.encoder.register_forward_hook(lambda *_: calls.append(1))
    logs: list[str] = []
    with pytest.raises(VQAConfigError, match="not enough disk space"):
        build_data(config, model, tokenizer, preprocessing, vqa_env.backbones(), log=logs.append)
    assert len(calls) == 1  # the one-image probe of the row shape, nothing more
    assert any("vision features" in line and "to build" in line for line in logs)
    written = list((tmp_path / "cache" / "features").rglob("*.safetensors"))
    assert written == []


def test_batches_are_placed_where_the_caches_are(vqa_env, tmp_path: Path) -> None:
    """Host tensors stay on the host; rows of a cache held on a device are gathered there
    (the meta device stands in for a GPU: placement without values)."""
    built = evaluate_built(vqa_env, tmp_path, [], cache=True)
    data = built["data"]
    for reader in data.features.readers():
        reader.keep_on(torch.device("meta"))
    batches = [[0, 1, 2], [5, 4]]
    for indices, batch in zip(
        batches, data.loader("val", batches, device=torch.device("meta")), strict=True
    ):
        assert batch["index"].tolist() == indices
        assert batch["vision_features"].device.type == "meta"
        assert batch["text_prefix"].device.type == "meta"
        assert batch["text_prefix"].dtype == batch["vision_features"].dtype == torch.float32
        assert batch["input_ids"].device.type == "cpu"
        assert batch["text_prefix"].shape[:2] == batch["input_ids"].shape


def test_the_loader_gives_the_collators_batches_in_order(vqa_env, tmp_path: Path) -> None:
    """Cached rows, crops held in memory and crops decoded per batch: the loader's batches,
    with or without workers, are the collator's."""
    for cache, held in ((True, True), (False, True), (False, False)):
        data = evaluate_built(vqa_env, tmp_path, [], cache=cache)["data"]
        if not cache:
            assert data.images.held is not None  # the tiny set's crops fit the budget
            assert torch.equal(data.images.held[[4, 1]], data.images.crops([4, 1]))
        if not held:
            data.images.held = None  # decoded per batch, as a set too large to hold is
        batches = [[3, 1, 2], [0], [7, 6, 5, 4]]
        for workers in (0, 2):
            data.collators["val"].workers = workers
            data.collators["val"]._stream = None
            streamed = list(data.loader("val", batches))
            assert len(streamed) == 3
            for indices, batch in zip(batches, streamed, strict=True):
                direct = data.collators["val"](indices)
                assert set(batch) == set(direct)
                for key, value in direct.items():
                    assert torch.equal(batch[key], value), (cache, held, workers, key)


def test_crops_held_equal_crops_decoded(vqa_env, tmp_path: Path) -> None:
    """``ImageStore.hold`` decodes in workers what ``crops`` decodes in this process, and
    refuses a set that does not fit its budget."""
    data = evaluate_built(vqa_env, tmp_path, [], cache=False)["data"]
    images = data.images
    held = images.held
    images.held = None
    slots = [0, 5, 2, 5]
    assert torch.equal(held[slots], images.crops(slots))
    assert not images.hold(budget=len(images.paths) * held[0].numel() - 1)
    assert images.held is None
