"""Build a made-up but self-consistent study directory, laid out as the runner writes it.

Reusable by any test that needs a study on disk::

    from fake_study import build_fake_study
    study_dir = build_fake_study(tmp_path / "study")

The default experiments are chosen so the seed's claims get known verdicts:
LoRA r=16 clearly beats unfreeze3 (supported); vision+text LoRA is clearly *worse* than
LoRA r=16 (the "best" claim is not supported); r=32 overfits from epoch 3 while r=16
never does, and its generalisation gap (question_losses.json) is larger (supported);
unfreeze3 overfits from epoch 2 and has the largest gap (LoRA delays overfitting:
supported); every LoRA run has a lower loss std than unfreeze3. The text-shift control is
detected (every text strategy beats the baseline on ``text_shift`` questions); the vision
control is not (vision+text LoRA is no better than LoRA r=16 on ``vision_shift``). Cell
``baseline/seed1`` failed (out of memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

QUESTION_TYPES = ("object", "number", "colour", "location")
LAYERS = 12
HIDDEN = 1024
LAYER_PARAMS = 12_600_000
TOWER_TOTALS = {
    "vision": 86_000_000,
    "projector": 1_200_000,
    "text_encoder": 12 * LAYER_PARAMS,
    "text_decoder": 12 * LAYER_PARAMS + 8_000_000,
}


@dataclass
class FakeExperiment:
    """What one fake experiment should look like."""

    name: str
    em: float
    """Share of test questions answered exactly (the same easy questions for everyone)."""
    layers_adapted: list[int]
    """1-based text-encoder layers with trainable parameters."""
    text_trainable: int
    vision_trainable: int = 0
    final_val_loss: float = 1.9
    overfit_from: int | None = None
    """Last epoch before val loss starts rising (while train loss keeps falling)."""
    loss_std: float = 0.2
    grad_spike: float = 2.0
    coverage: str = ""
    description: str = ""
    layer_grads: list[float] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)
    gap: float = 0.3
    """Held-out minus training loss of the final model (question_losses.json)."""
    subset_em: dict = field(default_factory=dict)
    """EM on a control subset, where it differs from ``em``."""


def lora_params(rank: int, layers: int = LAYERS, hidden: int = HIDDEN) -> int:
    """Parameters of LoRA on q, k, v of ``layers`` square ``hidden`` projections."""
    return layers * 3 * rank * 2 * hidden


DEFAULT_EXPERIMENTS = [
    FakeExperiment(
        "baseline",
        0.30,
        [],
        0,
        final_val_loss=2.2,
        loss_std=0.25,
        coverage="none (frozen)",
        overrides={"unfreeze_encoder_layers": 0},
        subset_em={"text_shift": 0.05},
    ),
    FakeExperiment(
        "unfreeze3",
        0.40,
        [10, 11, 12],
        3 * LAYER_PARAMS,
        final_val_loss=2.0,
        overfit_from=2,
        loss_std=0.30,
        grad_spike=4.0,
        coverage="layers 10-12 only (25% of encoder)",
        overrides={"unfreeze_encoder_layers": 3},
        gap=0.9,
        subset_em={"text_shift": 0.5},
    ),
    FakeExperiment(
        "lora_r8",
        0.60,
        list(range(1, 13)),
        lora_params(8),
        final_val_loss=1.9,
        loss_std=0.15,
        coverage="all 12 layers (LoRA)",
        overrides={"use_text_lora": True, "text_lora_r": 8},
        gap=0.3,
        subset_em={"text_shift": 0.6},
    ),
    FakeExperiment(
        "lora_r16",
        0.80,
        list(range(1, 13)),
        lora_params(16),
        final_val_loss=1.85,
        loss_std=0.12,
        coverage="all 12 layers (LoRA)",
        overrides={"use_text_lora": True, "text_lora_r": 16},
        gap=0.3,
        subset_em={"text_shift": 0.8, "vision_shift": 0.75},
    ),
    FakeExperiment(
        "lora_r32",
        0.70,
        list(range(1, 13)),
        lora_params(32),
        final_val_loss=1.95,
        overfit_from=3,
        loss_std=0.14,
        coverage="all 12 layers (LoRA)",
        overrides={"use_text_lora": True, "text_lora_r": 32},
        gap=0.6,
        subset_em={"text_shift": 0.7},
    ),
    FakeExperiment(
        "vision_text_lora",
        0.50,
        list(range(1, 13)),
        lora_params(16),
        vision_trainable=lora_params(8, hidden=768),
        final_val_loss=1.88,
        loss_std=0.13,
        coverage="all 12 layers (LoRA) + vision LoRA",
        overrides={
            "use_vision_lora": True,
            "vision_lora_r": 8,
            "use_text_lora": True,
            "text_lora_r": 16,
        },
        gap=0.3,
        subset_em={"text_shift": 0.5, "vision_shift": 0.5},
    ),
]


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _curves(spec: FakeExperiment, epochs: int, seed: int) -> tuple[list[float], list[float]]:
    """Train loss falls every epoch; val loss falls to its minimum then rises if it overfits."""
    offset = 0.01 * seed
    train = [spec.final_val_loss - 0.4 + 1.2 * 0.6**e + offset for e in range(epochs)]
    bottom = spec.overfit_from or epochs
    val = []
    for epoch in range(1, epochs + 1):
        if epoch <= bottom:
            val.append(spec.final_val_loss + 0.8 * (bottom - epoch) / bottom + offset)
        else:
            val.append(spec.final_val_loss + 0.06 * (epoch - bottom) + offset)
    return train, val


def _layer_grads(spec: FakeExperiment) -> dict[str, float]:
    adapted = set(spec.layers_adapted)
    lora = len(adapted) == LAYERS
    norms = {}
    for layer in range(1, LAYERS + 1):
        if layer not in adapted:
            norms[f"text_encoder.{layer - 1}"] = 0.0
        elif lora:  # small, smoothly growing towards the top, larger for larger ranks
            scale = 0.01 * (spec.text_trainable / lora_params(8)) ** 0.5
            norms[f"text_encoder.{layer - 1}"] = scale * (1 + layer / LAYERS)
        else:  # full layers: large norms
            norms[f"text_encoder.{layer - 1}"] = 0.8 + 0.1 * (layer - 10)
    return norms


SUBSETS = ("in_domain", "text_shift", "vision_shift")


def subset_of(index: int) -> str:
    """The control subset of fake test question ``index`` (they cycle)."""
    return SUBSETS[index % len(SUBSETS)]


def _predictions(
    spec: FakeExperiment, n_questions: int, seed: int, em_scale: float = 1.0
) -> list[dict]:
    # One shared difficulty per question: stronger systems answer a superset of the
    # questions weaker ones answer, as real systems roughly do.
    difficulty = np.random.default_rng(1234).random(n_questions)
    jitter = np.random.default_rng(seed).normal(0, 0.05, n_questions)
    rows = []
    for i in range(n_questions):
        em = em_scale * spec.subset_em.get(subset_of(i), spec.em)
        correct = bool(difficulty[i] + jitter[i] < em)
        answer = f"đáp án {i}"
        rows.append(
            {
                "id": f"q{i:03d}",
                "question": f"câu hỏi số {i}?",
                "prediction": answer if correct else "không biết",
                "answers": [answer],
                "type": QUESTION_TYPES[i % len(QUESTION_TYPES)],
                "em": 1.0 if correct else 0.0,
                "f1": 1.0 if correct else 0.25,
            }
        )
    return rows


def _scores(rows: list[dict]) -> dict:
    em = float(np.mean([r["em"] for r in rows]))
    f1 = float(np.mean([r["f1"] for r in rows]))
    return {"em": em, "f1": f1, "f1_set": f1, "n": len(rows)}


def question_losses(spec: FakeExperiment, n_questions: int, seed: int) -> dict:
    """Per-question losses of the final model: training questions around 0.2, held-out
    ones ``spec.gap`` higher (the same per-question difficulty for every experiment)."""
    rng = np.random.default_rng(99)
    noise = np.random.default_rng([100 + seed, sum(map(ord, spec.name))])
    held = 0.2 + spec.gap + 0.3 * rng.random(n_questions) + noise.normal(0, 0.02, n_questions)
    train = 0.2 + 0.3 * rng.random(n_questions) + noise.normal(0, 0.02, n_questions)
    return {
        "checkpoint": "last",
        "test": {f"q{i:03d}": float(v) for i, v in enumerate(held)},
        "train": {f"t{i:03d}": float(v) for i, v in enumerate(train)},
    }


def step_losses(spec: FakeExperiment, seed: int, epoch: int, mean: float, steps: int = 50):
    """One epoch's step losses: the same batches for every experiment of a seed (a shared
    difficulty per step) plus a little of the experiment's own, scaled so that their standard
    deviation is the experiment's ``loss_std`` (as ``train_loss_std`` says)."""
    shared = np.random.default_rng([200 + seed, epoch]).standard_normal(steps)
    own = np.random.default_rng([300 + seed, epoch, sum(map(ord, spec.name))]).standard_normal(
        steps
    )
    z = shared + 0.3 * own
    z = (z - z.mean()) / z.std()
    return [round(mean + spec.loss_std * (1 + 0.02 * seed) * float(v), 6) for v in z]


def write_cell(
    cell: Path,
    spec: FakeExperiment,
    seed: int,
    epochs: int = 6,
    n_questions: int = 40,
    data_dir: Path | None = None,
    train_questions: int = 4000,
    em_scale: float = 1.0,
    with_step_losses: bool = False,
) -> None:
    """Write one successful run directory for ``spec`` and ``seed`` (``with_step_losses``:
    metrics.jsonl keeps each epoch's step losses, as runs of vqadapt do since they were kept)."""
    train, val = _curves(spec, epochs, seed)
    layer_grads = _layer_grads(spec)
    encoder_grad = float(np.sqrt(sum(v**2 for v in layer_grads.values())))
    grad_norm = {
        "vision": 0.05 if spec.vision_trainable else 0.0,
        "projector": 0.5,
        "text_encoder": encoder_grad,
        "text_decoder": 0.0,
    }
    grad_total = float(np.sqrt(sum(v**2 for v in grad_norm.values())))
    metrics = []
    for epoch in range(1, epochs + 1):
        val_em = spec.em * (1 - 0.5 * 0.5**epoch)
        metrics.append(
            {
                "epoch": epoch,
                "train_loss": train[epoch - 1],
                "train_loss_std": spec.loss_std * (1 + 0.02 * seed),
                "val_loss": val[epoch - 1],
                "val_em": val_em,
                "val_f1": min(1.0, val_em + 0.1),
                "lr": 1e-4 * (1 - (epoch - 1) / epochs),
                "grad_norm": grad_norm,
                "grad_norm_max": spec.grad_spike * grad_total,
                "grad_norm_layers": layer_grads,
                "seconds": 30.0,
            }
        )
        if with_step_losses:
            metrics[-1]["step_losses"] = step_losses(spec, seed, epoch, train[epoch - 1])
    predictions = _predictions(spec, n_questions, seed, em_scale)
    per_type = {
        qtype: _scores([p for p in predictions if p["type"] == qtype]) for qtype in QUESTION_TYPES
    }
    trainable = {
        "vision": spec.vision_trainable,
        "projector": TOWER_TOTALS["projector"],
        "text_encoder": spec.text_trainable,
        "text_decoder": 0,
    }
    totals = dict(TOWER_TOTALS)
    totals["text_encoder"] += spec.text_trainable if spec.coverage.startswith("all") else 0
    totals["vision"] += spec.vision_trainable
    best_epoch = int(np.argmin(val)) + 1
    summary = {
        "best_epoch": best_epoch,
        "best_val_loss": min(val),
        "epochs_run": epochs,
        "stopped_early": False,
        "wall_time_s": 30.0 * epochs + len(spec.layers_adapted),
        "params": {
            "trainable": sum(trainable.values()),
            "total": sum(totals.values()),
            "per_tower": {
                tower: {"trainable": trainable[tower], "total": totals[tower]} for tower in totals
            },
            "coverage": spec.coverage,
            "text_encoder_layers_adapted": spec.layers_adapted,
            "text_encoder_layers_total": LAYERS,
        },
        "test": {**_scores(predictions), "per_type": per_type},
        "data": {
            "train": train_questions,
            "val": 100,
            "test": n_questions,
            "sources": {"test": str((data_dir or cell) / "test.csv")},
        },
        "code_version": "fake-0",
    }
    _write_json(
        cell / "status.json",
        {
            "status": "success",
            "error": None,
            "started": "2025-01-01T00:00:00",
            "finished": "2025-01-01T00:03:00",
        },
    )
    _write_jsonl(cell / "metrics.jsonl", metrics)
    _write_json(cell / "summary.json", summary)
    _write_jsonl(cell / "predictions_test.jsonl", predictions)
    _write_json(cell / "question_losses.json", question_losses(spec, n_questions, seed))
    _write_json(
        cell / "resources.json",
        {"peak_rss_mb": 800.0 + spec.text_trainable / 1e6, "process_seconds": 200.0},
    )


def write_subsets(data_dir: Path, n_questions: int) -> None:
    """The ``subsets.csv`` a synthetic set writes beside its test file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = ["split,id,kind,style,negated,subset"]
    for i in range(n_questions):
        subset = subset_of(i)
        style = "B" if subset == "text_shift" else "A"
        kind = "orientation" if subset == "vision_shift" else "colour"
        lines.append(f"test,q{i:03d},{kind},{style},0,{subset}")
    (data_dir / "subsets.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_fake_study(
    root: Path,
    experiments: list[FakeExperiment] | None = None,
    seeds: tuple[int, ...] = (0, 1),
    failed: tuple[tuple[str, int], ...] = (("baseline", 1),),
    n_questions: int = 40,
    epochs: int = 6,
    synthetic: bool = True,
    fractions: tuple[float, ...] = (1.0,),
    with_step_losses: bool = False,
) -> Path:
    """Write ``study.json`` and one cell per experiment, seed and training fraction (the
    smaller fractions with proportionally fewer questions and lower EM); ``failed`` cells
    (main fraction) fail. A synthetic study also gets ``data/subsets.csv``; its cells keep
    their step losses with ``with_step_losses``."""
    experiments = DEFAULT_EXPERIMENTS if experiments is None else experiments
    root = Path(root)
    data_dir = root / "data"
    if synthetic:
        write_subsets(data_dir, n_questions)
    _write_json(
        root / "study.json",
        {
            "preset": "fake",
            "seeds": list(seeds),
            "train_fractions": list(fractions),
            "experiments": [
                {
                    "name": e.name,
                    "description": e.description or e.coverage,
                    "overrides": e.overrides,
                }
                for e in experiments
            ],
            "notes": "made-up numbers for tests",
            "synthetic": synthetic,
        },
    )
    main = max(fractions)
    for spec in experiments:
        for seed in seeds:
            for fraction in fractions:
                if fraction == main:
                    continue
                cell = root / spec.name / f"train{fraction:g}" / f"seed{seed}"
                write_cell(
                    cell,
                    spec,
                    seed,
                    epochs,
                    n_questions,
                    data_dir,
                    int(4000 * fraction),
                    em_scale=0.5 + 0.5 * fraction,
                    with_step_losses=with_step_losses,
                )
            cell = root / spec.name / f"seed{seed}"
            if (spec.name, seed) in failed:
                _write_json(
                    cell / "status.json",
                    {
                        "status": "failed",
                        "error": "CUDA out of memory",
                        "started": "2025-01-01T00:00:00",
                        "finished": None,
                    },
                )
            else:
                write_cell(
                    cell, spec, seed, epochs, n_questions, data_dir,
                    with_step_losses=with_step_losses,
                )  # fmt: skip
    return root
