"""Export a run as one self-contained folder, load it with one call, check it against the run.

Layout of an export folder::

    vqadapt_export.json     what the folder holds: format, vqadapt version, model families,
                            blind or not, LoRA merged or not, decoding settings, preprocessing,
                            and the run it came from (provenance: loading never reads the run)
    text/                   the seq2seq text model and its tokenizer (``save_pretrained``)
    vision/                 the vision encoder and its ``preprocessor_config.json`` (not when blind)
    projector.safetensors   vision -> text projector and modality marker (not when blind)
    adapters/text/          without --merge: the LoRA adapters in peft's own format, next to
    adapters/vision/        the base towers above (text encoder, vision encoder, and where
    adapters/decoder/       they have LoRA the text decoder, keys relative to the text model,
    adapters/projector/     and the projector); with --merge they are folded into them
    answer_trie.json        training answers as token ids, for runs that decode with
                            --constrain_to_train_answers
    export_check.json       the check against the run (predictions and logits, held-out questions)

Tied embeddings: vqadapt gives the decoder its own copy of the shared input embedding
(``model.untie_decoder_embeddings``, which also sets ``tie_word_embeddings: false``). The text
model is written with every matrix under its own name, so that a plain
``AutoModelForSeq2SeqLM.from_pretrained`` (which re-ties nothing when the flag is off) gets back
exactly the trained weights: the encoder's embedding, and the decoder's copy that ``lm_head``
shares.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import vqadapt
from vqadapt import speed
from vqadapt.adapt import ADAPTER_SITES
from vqadapt.backbones import (
    ImagePreprocessing,
    load_image_preprocessing,
    load_text,
    load_tokenizer,
    load_vision,
    loading,
)
from vqadapt.checkpoint import load_adapter, lora_sites, save_adapter
from vqadapt.config import DataConfig
from vqadapt.data.images import ImageIndex, upright_rgb
from vqadapt.data.pipeline import (
    Collator,
    FeatureSources,
    ImageStore,
    Splits,
    encode_split,
    load_splits,
)
from vqadapt.data.records import VQARecord
from vqadapt.errors import VQAConfigError, VQADataError, VQAError
from vqadapt.evaluate import AnswerTrie, predict
from vqadapt.folders import FolderLock, recover_swap, staged, swap_in
from vqadapt.inference import LoadedRun, load_run, merge_lora
from vqadapt.io import atomic_write_json
from vqadapt.model import VQAModel
from vqadapt.runtime import Runtime, inference_runtime
from vqadapt.speed import SpeedPaths

EXPORT_FORMAT = 1
SETTINGS_FILE = "vqadapt_export.json"
CHECK_FILE = "export_check.json"
PROJECTOR_FILE = "projector.safetensors"
TRIE_FILE = "answer_trie.json"
CHECK_QUESTIONS = 32
PREDICT_BATCH = 32

# Largest absolute difference of teacher-forced logits allowed between export and run.
# Unmerged, the export holds the run's weights bit for bit and runs the same code: the logits
# are identical (0.0 measured); 1e-4 only leaves room for another matmul kernel. Merged,
# W + scale * B A is rounded once to fp32 per adapted matrix: measured 2.4e-6 on the tiny
# models (logits of size ~10), so 1e-3 leaves room for deeper towers and larger logits while a
# real fault (a wrong or missing tensor, other preprocessing) moves logits by far more.
UNMERGED_TOLERANCE = 1e-4
MERGED_TOLERANCE = 1e-3

Log = Callable[[str], None]

if TYPE_CHECKING:
    from PIL import Image


class ExportCheckError(VQAError, RuntimeError):
    """The exported model does not reproduce the run; ``report`` says how."""

    exit_code = 1

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def default_tolerance(merged: bool) -> float:
    return MERGED_TOLERANCE if merged else UNMERGED_TOLERANCE


# -- batches: the training pipeline, for any model ------------------------------------------
def records_collator(
    model: VQAModel,
    tokenizer,
    preprocessing: ImagePreprocessing | None,
    data: DataConfig,
    records: Sequence[VQARecord],
    image_root: str | Path | Any | None,
) -> Collator:
    """Records -> padded batches, tokenised, truncated and preprocessed as in training.
    ``image_root``: a folder the records' images are found in, or an index (one image)."""
    blind = model.vision is None
    if not blind and image_root is None:
        raise VQAConfigError("this model needs an image")
    index = None
    if not blind:
        index = ImageIndex(image_root) if isinstance(image_root, str | Path) else image_root
    images = ImageStore(index, preprocessing)
    encoded = encode_split(records, tokenizer, data, images.slot)
    return Collator(
        "export",
        encoded,
        tokenizer.pad_token_id,
        model.decoder_start_token_id,
        images,
        preprocessing,
        FeatureSources(),
        blind,
        model.speed_paths.length_multiple,
    )


# -- the loaded export ----------------------------------------------------------------------
@dataclass
class ExportedModel:
    """An exported model with its tokenizer, preprocessing and decoding settings."""

    model: VQAModel
    tokenizer: Any
    preprocessing: ImagePreprocessing | None
    settings: dict[str, Any]
    folder: Path
    runtime: Runtime
    trie: AnswerTrie | None = None

    @property
    def data(self) -> DataConfig:
        """Tokenisation limits, as in training."""
        decoding = self.settings["decoding"]
        return DataConfig(
            max_question_tokens=decoding["max_question_tokens"],
            max_answer_tokens=decoding["max_answer_tokens"],
        )

    def collator(self, records: Sequence[VQARecord], image_root: str | Path | None) -> Collator:
        return records_collator(
            self.model, self.tokenizer, self.preprocessing, self.data, records, image_root
        )

    def predict(
        self,
        records: Sequence[VQARecord],
        image_root: str | Path | None,
        num_beams: int | None = None,
    ) -> list[str]:
        """Answers to ``records`` (images resolved under ``image_root``), as the run decoded."""
        decoding = self.settings["decoding"]
        return predict(
            self.model,
            self.collator(records, image_root),
            len(records),
            self.tokenizer,
            batch_size=PREDICT_BATCH,
            max_new_tokens=decoding["max_answer_tokens"],
            num_beams=num_beams or decoding["num_beams"],
            trie=self.trie,
            runtime=self.runtime,
        )

    def answer(
        self,
        question: str,
        image: str | Path | Image.Image | None = None,
        num_beams: int | None = None,
    ) -> str:
        """Answer one question about an image file or a PIL image (none for a blind model)."""
        from vqadapt.text import nfc

        if image is None or isinstance(image, str | Path):
            return self._answer_file(nfc(question), Path(image) if image else None, num_beams)
        # An in-memory image takes the same path as a file: written losslessly, then loaded.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "image.png"
            upright_rgb(image).save(path)
            return self._answer_file(nfc(question), path, num_beams)

    def _answer_file(self, question: str, path: Path | None, num_beams: int | None) -> str:
        from vqadapt.inference import OneImage

        record = VQARecord("0", question, ("",), path.name if path else None)
        index = OneImage(path) if path is not None and self.model.vision is not None else None
        return self.predict([record], index, num_beams)[0]


def load_exported(
    folder: str | Path, device: str = "auto", precision: str = "auto"
) -> ExportedModel:
    """Load an export folder onto ``device`` (the best available by default): no run
    directory, training config or original backbone needed."""
    from safetensors.torch import load_file

    folder = Path(folder)
    settings_file = folder / SETTINGS_FILE
    if not settings_file.is_file():
        raise VQAConfigError(f"{folder} is not a vqadapt export (no {SETTINGS_FILE})")
    try:
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VQADataError(f"damaged or unreadable ({err})", file=settings_file) from None
    if not isinstance(settings, dict):
        raise VQADataError("damaged: expected a JSON object", file=settings_file)
    if settings.get("format") != EXPORT_FORMAT:
        raise VQAConfigError(
            f"{settings_file}: export format {settings.get('format')!r} is not {EXPORT_FORMAT} "
            f"(written by vqadapt {settings.get('vqadapt_version')})"
        )
    with loading(str(folder), "export"):  # a damaged file names the folder, never a traceback
        blind = settings["blind"]
        text = load_text(str(folder / "text"))
        tokenizer = load_tokenizer(str(folder / "text"))
        vision = None if blind else load_vision(str(folder / "vision"))
        preprocessing = None if blind else load_image_preprocessing(str(folder / "vision"))
        model = VQAModel(vision, text, dropout=settings["dropout"])
        if model.projector is not None:  # its plain weights, as the towers' (LoRA attaches next)
            model.projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))
        sites = {name: (attribute, adapter) for name, attribute, adapter in ADAPTER_SITES.values()}
        for folder_name in settings["adapters"]:
            attribute, adapter = sites[folder_name]
            _attach_adapter(getattr(model, attribute), folder / "adapters" / folder_name, adapter)
        trie = None
        if settings["decoding"]["constrain_to_train_answers"]:
            values = json.loads((folder / TRIE_FILE).read_text(encoding="utf-8"))
            trie = AnswerTrie(values["sequences"], values["eos_token_id"])
    model.requires_grad_(False)
    runtime = inference_runtime(device, precision)
    speed.install(model, SpeedPaths.for_device(runtime.device))
    model.to(runtime.device).eval()
    return ExportedModel(model, tokenizer, preprocessing, settings, folder, runtime, trie)


def _attach_adapter(tower: nn.Module, folder: Path, adapter: str = "default") -> None:
    """Inject LoRA layers as the adapter config says (as training did) and load its weights
    (as ``adapter``; the text model may hold the encoder's and the decoder's)."""
    import warnings

    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig.from_pretrained(str(folder))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, tower, adapter_name=adapter)
    tower.peft_config = {**getattr(tower, "peft_config", {}), adapter: config}
    for module in tower.modules():  # each LoRA layer keeps its own adapter active
        if isinstance(module, LoraLayer):
            module.set_adapter(list(module.lora_A.keys()))
    load_adapter(tower, folder, adapter)


# -- writing --------------------------------------------------------------------------------
def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state without LoRA layers: their base weights (merged or not) under the
    plain names; a matrix shared by several names is written under each (see module doc)."""
    state: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in module.state_dict().items():
        if ".lora_" in name:
            continue
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            tensor = tensor.clone()
        storages.add(storage)
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def _save_tower(tower: nn.Module, folder: Path) -> None:
    """``save_pretrained`` without LoRA layers (``_plain_state``)."""
    tower.save_pretrained(str(folder), state_dict=_plain_state(tower))


def _lora_settings(config) -> dict[str, Any]:
    init = config.init_lora_weights
    variant = "dora" if config.use_dora else "rslora" if config.use_rslora else "lora"
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "target_modules": config.target_modules,
        "variant": "pissa" if init == "pissa" else variant,
    }


def write_export(
    model: VQAModel,
    run: LoadedRun,
    folder: Path,
    *,
    merged: bool,
    checkpoint: str,
    answer_sequences: list[list[int]] | None,
) -> dict[str, Any]:
    """Write ``model`` (the run's, LoRA merged or not) and what it needs into ``folder``."""
    from safetensors.torch import save_file
    from transformers.utils import cached_file

    folder.mkdir(parents=True)
    _save_tower(model.text, folder / "text")
    run.tokenizer.save_pretrained(str(folder / "text"))
    if model.vision is not None:
        _save_tower(model.vision, folder / "vision")
        source = cached_file(run.backbones.vision, "preprocessor_config.json")
        shutil.copyfile(source, folder / "vision" / "preprocessor_config.json")
        save_file(_plain_state(model.projector), str(folder / PROJECTOR_FILE))
    sites = lora_sites(model)
    adapters = [] if merged else sorted(sites)
    for name in adapters:
        _, tower, adapter = sites[name]
        # the towers saved above hold the base weights as trained (a PiSSA residual included)
        save_adapter(tower, folder / "adapters" / name, None, adapter=adapter, base_rewritten=True)
    config = run.config
    if answer_sequences is not None:
        trie = {"eos_token_id": run.tokenizer.eos_token_id, "sequences": answer_sequences}
        atomic_write_json(folder / TRIE_FILE, trie)
    summary = _read_summary(run.run_dir)
    settings = {
        "format": EXPORT_FORMAT,
        "vqadapt_version": vqadapt.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "family": {
            "text": model.text_layout.family,
            "vision": model.vision_layout.family if model.vision_layout else None,
        },
        "blind": model.vision is None,
        "merged": merged,
        "adapters": adapters,
        "lora": {
            name: _lora_settings(tower.peft_config[adapter])
            for name, (_, tower, adapter) in lora_sites(run.model).items()
        },
        "dropout": config.train.dropout,
        "decoding": {
            "max_question_tokens": config.data.max_question_tokens,
            "max_answer_tokens": config.data.max_answer_tokens,
            "num_beams": config.train.num_beams,
            "constrain_to_train_answers": answer_sequences is not None,
        },
        "preprocessing": run.preprocessing.to_dict() if run.preprocessing else None,
        "source": {
            "run": str(run.run_dir.resolve()),
            "checkpoint": checkpoint,
            "strategy": summary.get("strategy"),
            "best_epoch": summary.get("best_epoch"),
            "code_version": summary.get("code_version"),
            "backbones": {"vision": run.backbones.vision, "text": run.backbones.text},
            "config": config.to_dict(),
        },
    }
    atomic_write_json(folder / SETTINGS_FILE, settings)
    return settings


# -- the check ------------------------------------------------------------------------------
def _read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary, or nothing when it is missing or damaged (provenance only)."""
    from vqadapt.run_dir import read_json

    try:
        return read_json(run_dir / "summary.json")
    except VQADataError:
        return {}


def run_splits(run: LoadedRun) -> Splits:
    """The run's data as it trained on it (same limits, same skipped images)."""
    skipped = (_read_summary(run.run_dir).get("skipped_bad_images") or {}).get("images") or []
    return load_splits(run.config.data, run.backbones.embedded_data, skipped)


def held_out(splits: Splits, questions: int) -> tuple[str, list[VQARecord]]:
    """The first ``questions`` test questions (validation ones when there is no test split)."""
    for name in ("test", "val"):
        records = getattr(splits, name)
        if records:
            return name, records[:questions]
    raise VQADataError("the run has no test or validation questions to check the export on")


def train_answer_sequences(run: LoadedRun, splits: Splits) -> list[list[int]] | None:
    """Token ids of the training answers, for runs decoded with --constrain_to_train_answers."""
    if not run.config.train.constrain_to_train_answers:
        return None
    encoded = encode_split(splits.train, run.tokenizer, run.config.data, lambda _: -1)
    return [list(ids) for ids in sorted({tuple(ids.tolist()) for ids in encoded.label_ids})]


def compare(
    exported: ExportedModel,
    reference: LoadedRun,
    records: list[VQARecord],
    image_root: Path | None,
    tolerance: float,
    trie: AnswerTrie | None,
) -> dict[str, Any]:
    """Teacher-forced logits and decoded answers of export and run on the same questions."""
    n = len(records)
    config = reference.config
    ref_collator = records_collator(
        reference.model,
        reference.tokenizer,
        reference.preprocessing,
        config.data,
        records,
        image_root,
    )
    ref_batch = ref_collator(list(range(n)))
    exp_batch = exported.collator(records, image_root)(list(range(n)))
    problems = []
    same_inputs = ref_batch.keys() == exp_batch.keys() and all(
        torch.equal(ref_batch[key], exp_batch[key]) for key in ref_batch
    )
    if not same_inputs:
        problems.append("the exported tokenizer or preprocessing gives other inputs than the run's")
    with torch.no_grad():
        with reference.runtime.autocast():
            ref_logits = reference.model(reference.runtime.move(ref_batch)).float().cpu()
        with exported.runtime.autocast():
            exp_logits = exported.model(exported.runtime.move(exp_batch)).float().cpu()
    diff = math.inf
    if ref_logits.shape == exp_logits.shape:
        diff = (ref_logits - exp_logits).abs().max().item()
    if not diff <= tolerance:  # also catches NaN
        problems.append(f"largest logit difference {diff:.3g} exceeds the tolerance {tolerance:g}")
    ref_answers = predict(
        reference.model,
        ref_collator,
        n,
        reference.tokenizer,
        batch_size=PREDICT_BATCH,
        max_new_tokens=config.data.max_answer_tokens,
        num_beams=config.train.num_beams,
        trie=trie,
        runtime=reference.runtime,
    )
    exp_answers = exported.predict(records, image_root)
    identical = sum(a == b for a, b in zip(ref_answers, exp_answers, strict=True))
    if identical < n:
        problems.append(f"{n - identical} of {n} predictions differ")
    return {
        "status": "failed" if problems else "passed",
        "questions": n,
        "identical_predictions": identical,
        "max_abs_logit_diff": diff if math.isfinite(diff) else None,
        "tolerance": tolerance,
        "inputs_identical": same_inputs,
        "merged": exported.settings["merged"],
        "num_beams": config.train.num_beams,
        "constrained_to_train_answers": trie is not None,
        "problems": problems,
        "differences": [
            {"question": r.question, "image": r.image, "run": a, "export": b}
            for r, a, b in zip(records, ref_answers, exp_answers, strict=True)
            if a != b
        ][:5],
    }


def check_export(
    folder: str | Path,
    run_dir: str | Path,
    checkpoint: str = "best",
    questions: int = CHECK_QUESTIONS,
    tolerance: float | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Check an export folder against its run (LoRA unmerged: the weights as trained), both
    on ``device`` in fp32 (the check is about weights, not precision); the report's
    ``status`` is ``passed`` or ``failed``."""
    exported = load_exported(folder, device, precision="no")
    reference = load_run(run_dir, checkpoint, merge=False, device=device, precision="no")
    splits = run_splits(reference)
    split, records = held_out(splits, questions)
    trie = _trie(reference, train_answer_sequences(reference, splits))
    if tolerance is None:
        tolerance = default_tolerance(exported.settings["merged"])
    report = compare(exported, reference, records, splits.image_root, tolerance, trie)
    return {"split": split, "run": str(run_dir), "checkpoint": checkpoint, **report}


def _trie(run: LoadedRun, sequences: list[list[int]] | None) -> AnswerTrie | None:
    return None if sequences is None else AnswerTrie(sequences, run.tokenizer.eos_token_id)


# -- the command ----------------------------------------------------------------------------
def check_destination(
    run_dir: Path, out: Path, overwrite: bool, run: LoadedRun | None = None
) -> None:
    """Refuse an --out that holds files (unless ``overwrite`` and it is an export), lies
    inside a run or holds one, or overlaps an input of the run (its backbones, its data)."""
    from vqadapt.run_dir import enclosing_run, is_run, refuse_overlap

    target, run_path = out.resolve(), run_dir.resolve()
    if target == run_path or target in run_path.parents:
        raise VQAConfigError(f"--out {out} would replace the run directory {run_dir}")
    if out.exists() and not out.is_dir():
        raise VQAConfigError(f"--out {out} is a file, not a folder")
    outer = enclosing_run(out)
    if outer is not None or is_run(out):
        raise VQAConfigError(
            f"--out {out} lies inside the run {outer or out}: choose a folder outside any run"
        )
    if run is not None:
        d = run.config.data
        refuse_overlap(
            "--out",
            out,
            {
                "text model": run.backbones.text,
                "vision model": run.backbones.vision,
                "train_file": d.train_file,
                "test_file": d.test_file,
                "val_file": d.val_file,
                "image_root": d.image_root,
            },
        )
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise VQAConfigError(
                f"{out} is not empty: pass --overwrite to replace it, or choose another --out"
            )
        if not (out / SETTINGS_FILE).is_file():
            raise VQAConfigError(
                f"--overwrite replaces only an earlier export, and {out} is none (no "
                f"{SETTINGS_FILE}): nothing was changed; choose another --out"
            )


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    checkpoint: str = "best",
    merge: bool = False,
    overwrite: bool = False,
    questions: int = CHECK_QUESTIONS,
    tolerance: float | None = None,
    log: Log = print,
    device: str = "auto",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Export a run's checkpoint into ``out`` and check it against the run; returns the check.

    The folder is built beside ``out`` and renamed into place only once the check passed, so
    ``out`` never holds a partial or failing export. A failed check raises ``ExportCheckError``.
    The check runs on ``device`` in fp32; the files hold CPU tensors whatever the device.
    """
    run_dir, out = Path(run_dir), Path(out)
    check_destination(run_dir, out, overwrite)
    if tolerance is None:
        tolerance = default_tolerance(merge)
    with FolderLock(out, "export"):
        recover_swap(out)  # what a killed export left beside --out
        log(f"loading {run_dir} ({checkpoint} checkpoint)")
        reference = load_run(
            run_dir, checkpoint, merge=False, device=device, precision="no",
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        check_destination(run_dir, out, overwrite, reference)
        splits = run_splits(reference)
        split, records = held_out(splits, questions)
        sequences = train_answer_sequences(reference, splits)
        model = reference.model
        if merge:
            model = copy.deepcopy(model)  # the reference keeps the adapters as trained
            log(f"merged {merge_lora(model)} LoRA layers into their weights")
        out.parent.mkdir(parents=True, exist_ok=True)
        with staged(out) as tmp:
            tmp.rmdir()  # write_export makes the folder itself
            write_export(
                model, reference, tmp, merged=merge, checkpoint=checkpoint,
                answer_sequences=sequences,
            )  # fmt: skip
            del model
            log(f"checking the export against the run on {len(records)} {split} questions")
            exported = load_exported(tmp, device, precision="no")
            trie = _trie(reference, sequences)
            report = compare(exported, reference, records, splits.image_root, tolerance, trie)
            report = {"split": split, "run": str(run_dir), "checkpoint": checkpoint, **report}
            if report["status"] != "passed":
                raise ExportCheckError(
                    f"export check failed: {'; '.join(report['problems'])}. "
                    f"Nothing was written to {out}.",
                    report,
                )
            atomic_write_json(tmp / CHECK_FILE, report)
            swap_in(tmp, out)
    log(f"exported {run_dir} to {out}")
    return report
