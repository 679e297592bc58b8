"""Devices and precision without a GPU: what a GPU run would trip over, caught on the CPU.

- The CUDA profile's training step runs on the meta device: no value exists there, so any host
  read (``.item()``, ``.tolist()``, ``nonzero``, a boolean index, ``if tensor:``) raises, and
  forward pre-hooks check that every module gets its inputs on the parameters' device.
- Every batch of every command passes through ``Runtime.move`` (the one move function).
- The optimizer step skips a non-finite step on the device, and under fp16 lets the loss
  scaler skip its overflow steps without stopping training.
- CPU bf16 autocast trains and evaluates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vqadapt import speed
from vqadapt.adapt import apply_adaptation
from vqadapt.config import AdaptConfig
from vqadapt.errors import VQAConfigError, VQATrainingError
from vqadapt.loop import GradientMeter, LoopState, OptimizerStep, global_weighted_loss
from vqadapt.model import VQAModel
from vqadapt.runtime import Runtime, resolve_device, resolve_precision
from vqadapt.speed import SpeedPaths

STRATEGIES = {
    "baseline": AdaptConfig(),
    "unfreeze3": AdaptConfig(unfreeze_encoder_layers=3),
    "text_lora": AdaptConfig(use_text_lora=True, text_lora_r=4),
    "vision_text_lora": AdaptConfig(use_text_lora=True, text_lora_r=4, use_vision_lora=True),
}


class _SingleProcess:
    """What ``global_weighted_loss`` asks of accelerate with one process."""

    num_processes = 1

    @staticmethod
    def reduce(tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        return tensor.clone()


class _RecordingOptimizer:
    """Stands in for fused AdamW (which has no meta-device kernel): records its calls."""

    def __init__(self, model) -> None:
        self.model = model
        self.found_inf_seen: list[torch.Tensor] = []

    def step(self) -> None:
        self.found_inf_seen.append(self.found_inf)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model.parameters():
            param.grad = None


def _inputs_on(device: str):
    """A forward pre-hook asserting every tensor a module receives is on ``device``."""

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)
        elif isinstance(value, list | tuple):
            for item in value:
                yield from tensors(item)

    def hook(module, args, kwargs):
        for tensor in tensors((args, kwargs)):
            assert tensor.device.type == device, (
                f"{type(module).__name__} got a tensor on {tensor.device}, expected {device}"
            )

    return hook


def _meta_model(make_tiny_model, family: str, adapt: AdaptConfig) -> VQAModel:
    model = make_tiny_model(family, speed="library")
    apply_adaptation(model, adapt)
    speed.install(model, SpeedPaths.for_device("cuda"))
    model.to("meta")
    for module in model.modules():
        module.register_forward_pre_hook(_inputs_on("meta"), with_kwargs=True)
    return model


def _cached(model: VQAModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch as the feature caches hand it over: frozen outputs instead of inputs."""
    with torch.no_grad():
        if model.text_cache_layers:
            batch["text_prefix"] = model.encode_text_prefix(
                batch["input_ids"], batch["attention_mask"]
            )
        if model.vision_frozen:
            batch["vision_features"] = model.encode_image(batch.pop("pixel_values"))
    return batch


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # a stub optimizer
@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("family", ["mbart", "t5"])
def test_cuda_profile_training_step_never_reads_the_device(
    make_tiny_model, make_batch, family, strategy, cached
) -> None:
    """Forward, loss, backward, gradient norms, clipping and the skip flag of one training
    step, as a GPU runs them, with no value to read: a host sync anywhere raises."""
    model = _meta_model(make_tiny_model, family, STRATEGIES[strategy])
    batch = {k: v.to("meta") for k, v in make_batch(model, batch_size=4).items()}
    if cached:
        batch = _cached(model, batch)
    model.train()
    per_sample = model(batch, return_losses=True, label_smoothing=0.1)
    loss, value = global_weighted_loss(per_sample, batch["weights"], _SingleProcess())
    loss.backward()
    optimizer = _RecordingOptimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), lambda _: 1.0
    )
    step = OptimizerStep(model, optimizer, scheduler, GradientMeter(model), max_grad_norm=1.0)
    total = step(value)
    assert total.device.type == "meta"
    assert [flag.device.type for flag in optimizer.found_inf_seen] == ["meta"]
    assert step.skipped.device.type == "meta"  # counted on the device, read per epoch
    model.eval()
    with torch.no_grad():  # the validation loss takes the same path
        assert model(batch, return_losses=True).shape == (4,)


def test_the_cuda_profile_has_no_host_sync_path() -> None:
    cuda = SpeedPaths.for_device("cuda")
    assert not cuda.packed_encoder and not cuda.head_on_labels  # nonzero / boolean indexing
    assert not cuda.fast_dropout  # a CPU mask
    assert SpeedPaths.for_device("cpu").packed_encoder
    assert SpeedPaths.for_device("mps") == SpeedPaths.library()


def test_speed_paths_parse() -> None:
    assert SpeedPaths.parse("auto", "cpu") == SpeedPaths.for_device("cpu")
    assert SpeedPaths.parse("library", "cuda") == SpeedPaths.library()
    parsed = SpeedPaths.parse("lean_decoder, key_multiple=8", "cpu")
    assert parsed == SpeedPaths(lean_decoder=True, key_multiple=8)
    assert parsed.describe() == "lean_decoder, key_multiple=8"
    for bad in ("warp_drive", "key_multiple=0", "key_multiple=x", "lean_decoder=2"):
        with pytest.raises(VQAConfigError, match="--speed_paths"):
            SpeedPaths.parse(bad, "cpu")


def test_installed_paths_are_those_the_family_supports(make_tiny_model) -> None:
    every = SpeedPaths.for_device("cpu")
    assert speed.install(make_tiny_model("mbart", speed="library"), every) == every
    t5 = speed.install(make_tiny_model("t5", speed="library"), every)
    assert not (t5.packed_encoder or t5.lean_decoder or t5.absorbed_cross_attention)
    assert t5.fast_dropout and t5.key_multiple == 16  # family-independent


def test_installing_keeps_each_module_in_its_mode(make_tiny_model) -> None:
    model = make_tiny_model(speed="library").eval()
    speed.install(model, SpeedPaths.for_device("cpu"))  # swaps dropout modules in
    assert not any(module.training for module in model.modules())


@pytest.mark.parametrize("strategy", ["baseline", "text_lora"])
def test_length_buckets_change_nothing(make_tiny_model, make_batch, strategy) -> None:
    """Questions and answers padded to a multiple of 8 (the CUDA profile): same losses."""
    model = make_tiny_model(speed="library", dropout=0.0)
    apply_adaptation(model, STRATEGIES[strategy])
    model.eval()
    batch = make_batch(model, batch_size=4)
    padded = speed.round_lengths(batch, 8, model.text.config.pad_token_id)
    assert padded["input_ids"].shape[1] == 8 and padded["labels"].shape[1] == 8
    with torch.no_grad():
        torch.testing.assert_close(
            model(padded, return_losses=True),
            model(batch, return_losses=True),
            rtol=1e-5,
            atol=1e-6,
        )


# -- the optimizer step: non-finite steps and fp16 --------------------------------------------
def _toy_step(**kwargs):
    torch.manual_seed(0)
    model = _Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step = OptimizerStep(model, optimizer, scheduler, GradientMeter(model), 1.0, **kwargs)
    return model, step


class _Toy(torch.nn.Module):
    """Enough of a VQAModel for the gradient meter: named towers, a text-encoder layout."""

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.projector = torch.nn.Linear(3, 2)
        self.text_layout = SimpleNamespace(num_layers=0, layers_path="none.layers")
        self.text_family = SimpleNamespace(decoder_layers_path="none.decoder_layers")
        self.vision_layout = None
        self.text_encoder = torch.nn.Module()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x).sum()


def _backward(model, scaler=None, poison: bool = False) -> torch.Tensor:
    loss = model(torch.ones(4, 3))
    (loss if scaler is None else scaler.scale(loss)).backward()
    if poison:
        model.projector.weight.grad[0, 0] = float("inf")
    return loss.detach()


def test_a_non_finite_step_is_skipped_on_the_device_and_reported_under_stop() -> None:
    model, step = _toy_step(on_nonfinite="stop")
    before = model.projector.weight.detach().clone()
    step(_backward(model, poison=True))
    assert torch.equal(model.projector.weight, before)  # never applied
    assert step.skipped_steps() == 1
    with pytest.raises(VQATrainingError, match="epoch 3, step 1"):
        step.check(epoch=3, checkpoint="run/last", checkpoint_epoch=2)
    step(_backward(model))  # a finite step is applied
    assert not torch.equal(model.projector.weight, before)


def test_skip_policy_counts_and_goes_on() -> None:
    model, step = _toy_step(on_nonfinite="skip")
    step(_backward(model, poison=True))
    step(torch.tensor(float("nan")) + _backward(model))  # a non-finite loss
    step.check(epoch=1, checkpoint="x", checkpoint_epoch=0)  # no error
    assert step.skipped_steps() == 2
    step.reset_epoch()
    assert step.skipped_steps() == 0


def test_fp16_overflow_steps_are_the_scalers_business() -> None:
    """Gradients are unscaled before they are measured and clipped; an inf step is skipped
    by the scaler, counted, and never stops training; the scale backs off."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, step = _toy_step(on_nonfinite="stop", scaler=scaler)
    before = model.projector.weight.detach().clone()
    step(_backward(model, scaler, poison=True))
    assert torch.equal(model.projector.weight, before)
    assert scaler.get_scale() == 2.0**9
    step.check(epoch=1, checkpoint="x", checkpoint_epoch=0)  # not fatal
    assert step.skipped_steps() == 1
    total = step(_backward(model, scaler))
    assert not torch.equal(model.projector.weight, before)
    # measured unscaled: every gradient entry of sum(W x + b) over 4 rows of ones is 4
    assert float(total) == pytest.approx(4 * 8**0.5)


def test_loop_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    state = LoopState(epoch=2, step=30, best=0.5, best_epoch=2, best_val={"em": 0.25})
    torch.save({"loop": state.to_dict()}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert LoopState.from_dict(loaded["loop"]) == state
    old = {"epoch": 1, "best": 0.7, "best_epoch": 1, "bad_epochs": 0, "step": 12}
    assert LoopState.from_dict(old).best_val is None  # checkpoints of earlier versions load


# -- device and precision resolution ----------------------------------------------------------
def test_devices_and_precisions_resolve() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "no"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(VQAConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(VQAConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(VQAConfigError, match="not a device"):
        resolve_device("floppy")


def test_rng_state_without_gpus_ignores_saved_cuda_states() -> None:
    from vqadapt.loop import rng_state, set_rng_state

    state = rng_state() | {"cuda": [torch.zeros(16, dtype=torch.uint8)] * 9}  # 9 GPUs wrote it
    expected = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


# -- every batch goes through Runtime.move ------------------------------------------------
@pytest.fixture
def moved_only(monkeypatch):
    """Tag what ``Runtime.move`` returns; the model refuses batches without the tag."""
    real_move = Runtime.move
    seen = {"batches": 0}

    def move(self, batch):
        out = real_move(self, batch)
        for value in out.values():
            if isinstance(value, torch.Tensor):
                value._vqadapt_moved = True
        return out

    def check(batch):
        seen["batches"] += 1
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                assert getattr(value, "_vqadapt_moved", False), f"batch[{key!r}] was not moved"

    real_forward, real_generate = VQAModel.forward, VQAModel.generate

    def forward(self, batch, *args, **kwargs):
        check(batch)
        return real_forward(self, batch, *args, **kwargs)

    def generate(self, batch, *args, **kwargs):
        check(batch)
        return real_generate(self, batch, *args, **kwargs)

    monkeypatch.setattr(Runtime, "move", move)
    monkeypatch.setattr(VQAModel, "forward", forward)
    monkeypatch.setattr(VQAModel, "generate", generate)
    return seen


def test_every_command_moves_its_batches(vqa_env, tmp_path, moved_only) -> None:
    """train, eval, predict, export (its check) and the demo's answer all hand the model
    batches that went through ``Runtime.move``: on a GPU nothing stays on the CPU."""
    from vqadapt.demo.core import explain_answer
    from vqadapt.export import export_run
    from vqadapt.inference import answer_question, evaluate_run, load_run
    from vqadapt.train import train

    run = tmp_path / "run"
    train(vqa_env.config(run, "--use_text_lora", "--text_lora_r", "4"), log=lambda _: None)
    after_train = moved_only["batches"]
    assert after_train > 0
    evaluate_run(run, "test", log=lambda _: None)
    loaded = load_run(run)
    image = next((vqa_env.data / "images").iterdir())
    assert isinstance(answer_question(loaded, "có mấy hình?", image), str)
    explain_answer(loaded, "có mấy hình?", image, num_beams=2)
    export_run(run, tmp_path / "export", questions=4, log=lambda _: None)
    assert moved_only["batches"] > after_train


def test_cpu_bf16_autocast_trains_and_evaluates(vqa_env, tmp_path) -> None:
    from vqadapt.inference import evaluate_run
    from vqadapt.train import train

    run = tmp_path / "run"
    summary = train(
        vqa_env.config(run, "--mixed_precision", "bf16", "--unfreeze_encoder_layers", "3"),
        log=lambda _: None,
    )
    assert summary["device"] == {"type": "cpu", "precision": "bf16"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in rows)
    scores = evaluate_run(run, "test", log=lambda _: None, precision="bf16")
    assert 0.0 <= scores["em"] <= 1.0 and scores["n"] > 0


def test_compile_asks_accelerate_for_inductor() -> None:
    """``--compile`` hands the model to torch.compile (inductor) when accelerate prepares it;
    the compiled step itself is run by the cuda tests (on a CPU the profile's numpy dropout
    breaks the graph, so compiling there buys nothing)."""
    from vqadapt.runtime import training_runtime

    runtime = training_runtime("cpu", "no", compile_model=True)
    assert runtime.accelerator.state.dynamo_plugin.backend.value.lower() == "inductor"
    assert training_runtime("cpu", "no").accelerator.state.dynamo_plugin.backend.value == "NO"
