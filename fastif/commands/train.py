"""`fastif train`: fine-tune a sequence classifier and save it, with its metrics, in the run folder.

Steps: load the configured splits, build the demo tiny BERT (``model.name_or_path=demo``) or load
a Hugging Face checkpoint, make the ``model.trainable`` parameters trainable, fine-tune, evaluate
in distribution and on the challenge split (overall, by gold label kind and by heuristic), write
``metrics.json`` and save the model plus tokenizer to ``<run>/model/`` (``save_pretrained``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastif.commands import ExperimentSettings
from fastif.runs import Run, frame_sha256, progress_enabled

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"


@dataclass
class TrainSettings(ExperimentSettings):
    """Settings of `fastif train`: the experiment's model, data and training recipe."""


SCHEMA = TrainSettings


def execute(settings: TrainSettings, run: Run) -> None:
    import torch

    from fastif.data import load_splits
    from fastif.data.encoding import encode
    from fastif.models import apply_trainable, resolve_device
    from fastif.training import train_classifier

    device = resolve_device(settings.device)
    run.annotate(device=str(device))
    torch.manual_seed(settings.seed)

    model, tokenizer = load_model_for_training(settings, run, device)  # first: a bad path fails fast
    splits = load_splits(settings.data)
    record_data(run, settings, splits)
    trainable = apply_trainable(model, settings.model.trainable)
    run.log.info("model %s: %d of %d parameter tensors trainable", settings.model.name_or_path,
                 len(trainable), sum(1 for _ in model.parameters()))

    max_length = settings.model.max_length
    encoded = {name: encode(frame, tokenizer, max_length) for name, frame in splits.items()}
    run.log.info("data %s: %s", settings.data.name,
                 ", ".join(f"{name} {len(frame)}" for name, frame in splits.items()))

    summary = train_classifier(model, encoded["train"], settings.train, device, settings.seed, progress_enabled())
    run.log.info("trained %d steps in %.1f s (final loss %.4f)", summary["steps"], summary["seconds"], summary["final_loss"])

    metrics = classification_metrics(model, splits, encoded, settings.train.eval_batch_size, device)
    metrics["training"] = summary
    metrics["trainable_parameters"] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    run.write_json(METRICS_FILE, metrics)
    run.log.info("in-distribution accuracy %.3f", metrics["in_distribution_accuracy"])
    if "challenge_accuracy" in metrics:
        run.log.info("challenge accuracy %.3f (entailment %.3f, non-entailment %.3f)",
                     metrics["challenge_accuracy"], metrics["challenge_entailment_accuracy"],
                     metrics["challenge_non_entailment_accuracy"])

    save_checkpoint(model, tokenizer, run.dir / MODEL_DIR)
    run.log.info("model saved to %s", run.dir / MODEL_DIR)


def load_model_for_training(settings: ExperimentSettings, run: Run, device):
    """(model, tokenizer): the demo tiny BERT built from config, or a checkpoint to fine-tune."""
    from fastif.models import load_classifier

    name_or_path = settings.model.name_or_path
    if name_or_path == "demo":
        from fastif.data.demo import demo_tokenizer
        from fastif.models import build_demo_model

        tokenizer = demo_tokenizer()
        model = build_demo_model(settings.model, tokenizer)
        return model.to(device), tokenizer
    if Path(name_or_path).expanduser().exists():
        run.record_input(Path(name_or_path).expanduser(), "model")
    model, tokenizer = load_classifier(name_or_path, settings.model.num_labels, device)
    return model.to(device), tokenizer


def record_data(run: Run, settings: ExperimentSettings, splits: dict) -> None:
    """Hash data files named in the config as inputs, and fingerprint every split's content."""
    data = settings.data
    for split in ("train", "eval", "challenge"):
        value = getattr(data, split)
        if value and Path(value).expanduser().is_file():
            run.record_input(Path(value).expanduser(), f"data.{split}")
    run.annotate(data={name: {"rows": len(frame), "sha256": frame_sha256(frame)} for name, frame in splits.items()})


def classification_metrics(model, splits: dict, encoded: dict, batch_size: int, device) -> dict:
    """Accuracy in distribution and on the challenge split: overall, by gold label kind, by heuristic."""
    from fastif.training import evaluate

    result = evaluate(model, encoded["eval"], batch_size, device)
    metrics = {
        "in_distribution_accuracy": result["accuracy"],
        "in_distribution_loss": result["loss"],
        "in_distribution_n": result["n"],
    }
    if "challenge" not in splits:
        return metrics
    challenge = splits["challenge"]
    kind = challenge["label_name"].where(challenge["label_name"] == "entailment", "non-entailment")
    by_kind = evaluate(model, encoded["challenge"], batch_size, device, groups=kind.reset_index(drop=True))
    metrics.update({
        "challenge_accuracy": by_kind["accuracy"],
        "challenge_loss": by_kind["loss"],
        "challenge_n": by_kind["n"],
        "challenge_entailment_accuracy": by_kind["groups"].get("entailment", {}).get("accuracy"),
        "challenge_non_entailment_accuracy": by_kind["groups"].get("non-entailment", {}).get("accuracy"),
        "challenge_by_label": by_kind["groups"],
    })
    if "heuristic" in challenge.columns:
        by_heuristic = evaluate(model, encoded["challenge"], batch_size, device,
                                groups=challenge["heuristic"].astype(str).reset_index(drop=True))
        metrics["challenge_by_heuristic"] = by_heuristic["groups"]
    return metrics


def save_checkpoint(model, tokenizer, target: Path) -> None:
    """save_pretrained model + tokenizer into ``target``, which appears whole or not at all."""
    import os
    import shutil

    staging = target.with_name(f".{target.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, target)
