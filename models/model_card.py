"""The model card (Mitchell et al. 2019): what the model is for, what it was trained on, how well it does and where
it stops. Built from the run directory's own files, shipped as assets.extra/model_card.json in every SavedModel and
rendered as a section of report.html (models/report.py `render_model_card`). Pure: files in, a JSON-ready dict out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from medpipe.config import TaskConfig

CARD_VERSION = 1

KNOWN_LIMITS = (
    "Not a medical device: for research and quality assurance; every finding needs a clinician's read.",
    "Trained and tested on one public collection; performance on another scanner, site, protocol or population is "
    "unknown until measured there.",
    "One 2-D image in, one finding out: no volume, no prior study, no clinical context.",
    "The out-of-distribution guard flags images unlike the training data as 'outside intended use'; it was tested "
    "only against the probe sets listed here and cannot promise to catch every unfamiliar input (an image of the "
    "right kind with an unseen pathology looks in distribution).",
    "Calibration was fitted on the validation split: the stated confidence is trustworthy only on data like it.",
    "Grad-CAM shows where the model looked, not why; it is not a segmentation.",
)


def _read(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _with_ci(metrics: dict, name: str) -> dict:
    interval = (metrics.get("confidence_intervals") or {}).get(name)
    return {"value": metrics.get(name), "ci95": interval}


def intended_use(config: TaskConfig) -> dict:
    labels = ", ".join(config.labels)
    kind = "one class out of" if config.task == "multiclass" else "a label among" if config.task == "multilabel" \
        else "one of two classes:"
    return {
        "use": f"Research and quality assurance: assign {kind} {labels} to a single 2-D image of the kind the model "
               f"was trained on ({config.name}), as a second reader behind a clinician.",
        "users": "Radiologists and imaging researchers, through medpipe's gateway, viewer or PACS integration.",
        "out_of_scope": [
            "Images of another body part, modality or projection: answered 'outside intended use' when the OOD guard "
            "flags them (in_distribution = false), never with a finding.",
            "Diagnosis without a clinician; triage of emergencies; paediatric or other populations absent from the "
            "training data.",
        ],
    }


def build_model_card(run_dir: str | Path, config: TaskConfig, metrics: Optional[dict] = None) -> dict:
    """The card of a training run; `metrics` defaults to RUN_DIR/evaluation/metrics.json (None before evaluate)."""
    run = Path(run_dir)
    metadata = _read(run / "train_metadata.json") or {}
    calibration = _read(run / "calibration.json")
    ood_fit = _read(run / "ood.json")
    metrics = metrics if metrics is not None else _read(run / "evaluation" / "metrics.json")
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "model": {
            "name": config.serving.model_name,
            "task": config.task,
            "labels": list(config.labels),
            "architecture": metadata.get("model", config.training.model),
            "parameters": metadata.get("parameters"),
            "input": f"{config.image.size} x {config.image.size} pixels, {config.image.channels} channel(s), "
                     "padded to a square (aspect ratio kept)",
            "code_version": metadata.get("code_version"),
        },
        "intended_use": intended_use(config),
        "training_data": {
            "train_examples_per_class": metadata.get("train_examples_per_class"),
            "val_examples_per_class": metadata.get("val_examples_per_class"),
            "split": "by patient pseudonym where patient IDs exist, else by pixel hash (stable when data is added)",
            "schema_fingerprint": (metadata.get("data") or {}).get("schema_fingerprint"),
            "epochs_run": metadata.get("epochs_run"),
        },
        "metrics": None,
        "calibration": None,
        "ood": None,
        "known_limits": list(KNOWN_LIMITS),
    }
    if metrics is not None:
        card["metrics"] = {
            "evaluated_on": (metrics.get("data") or {}).get("description"),
            "examples": metrics.get("num_examples"),
            "accuracy": _with_ci(metrics, "accuracy"),
            "macro_f1": _with_ci(metrics, "macro_f1"),
            "macro_auc": _with_ci(metrics, "macro_auc"),
            "per_class": {label: {k: row.get(k) for k in ("sensitivity", "specificity", "precision", "support")}
                          for label, row in (metrics.get("per_class") or {}).items()},
            "by_split": metrics.get("splits"),  # carved and shift-aware figures side by side
        }
    if calibration is not None:
        card["calibration"] = {
            "method": calibration.get("method"),
            "temperature": calibration.get("temperature"),
            "val_ece_before": calibration.get("val_ece_before"),
            "val_ece_after": calibration.get("val_ece_after"),
            "test_ece_before": metrics.get("ece_uncalibrated") if metrics else None,
            "test_ece_after": metrics.get("ece") if metrics else None,
        }
    if ood_fit is not None:
        evaluated = (metrics or {}).get("ood") or {}
        card["ood"] = {
            "method": ood_fit.get("method"),
            "description": ood_fit.get("description"),
            "threshold": ood_fit.get("threshold"),
            "target_retention": ood_fit.get("target_retention"),
            "val_retention": ood_fit.get("val_retention"),
            "test_retention": evaluated.get("retention"),
            "auroc": evaluated.get("auroc"),
            "probe_sets": [{k: probe.get(k) for k in ("name", "description", "examples", "auroc",
                                                      "flagged_out_of_distribution")}
                           for probe in evaluated.get("probe_sets", [])],
        }
    rule = _read(run / "study_rule.json")
    if rule is not None:
        card["study_rule"] = study_rule_section(rule, (metrics or {}).get("study"))
    return card


def study_rule_section(rule: dict, evaluated: Optional[dict] = None) -> dict:
    """How this model decides a study (medpipe/study.py), how its operating point was chosen and, when evaluated,
    the study-level figures by study size."""
    section = {"rule": rule.get("rule"), "normal_class": rule.get("normal_class"),
               "operating_point": rule.get("operating_point"), "sensitivity_target": rule.get("sensitivity_target"),
               "how_chosen": rule.get("provenance", {}),
               "description": "a study is abnormal when any in-distribution image's abnormal probability "
                              "(1 - P(normal)) reaches the operating point; its class is the abnormal class with the "
                              "highest probability on the most abnormal image; images outside intended use are "
                              "excluded" if rule.get("rule") == "abnormal_first" else "highest class probability "
                              "over the images"}
    if evaluated:
        section["evaluated"] = evaluated
    return section
