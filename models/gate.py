"""The quality gate (TFX Evaluator style): blessed or not, and why.

A model is blessed when every gated metric reaches its absolute threshold from `evaluation.thresholds` (and, when
set, the calibrated ECE is at most `max_ece` and the OOD AUROC over the `evaluate --ood` probe sets at least
`min_ood_auroc`), and, when a model is already published under the `stable` version label, the candidate is shown
NON-INFERIOR to it on the same images: for every gated metric the one-sided 95% lower bound of the paired-bootstrap
difference (candidate - stable) is above -`evaluation.max_regression` (the margin, per metric if a mapping). With
fewer than `evaluation.min_paired_examples` images the comparison is not made: the verdict is "insufficient
evidence" (not blessed, nothing published), unless another evaluation of the same run (the golden set beside a
small test split) has enough. The evidence (n, differences, bounds, McNemar's p-value) is in blessing.json. The
first model (no stable version) is judged on the absolute thresholds only.

The stable model's metrics are read from `REPO/NAME/<version>/assets.extra/medpipe_metrics.json` (the metrics.json
that `medpipe publish` copies next to the SavedModel). They must come from the same split of the same data for the
comparison to mean anything; when the file is missing, `models.evaluate` evaluates the stable SavedModel itself on
the data being evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from medpipe.models_config import CONFIG_FILE, read_config, version_labels

GATED_METRICS = ("accuracy", "macro_f1", "macro_auc")
STABLE_LABEL = "stable"
BASELINE_METRICS_FILE = "medpipe_metrics.json"  # in REPO/NAME/<version>/assets.extra/


BLESSED, NOT_BLESSED, INSUFFICIENT = "blessed", "not_blessed", "insufficient_evidence"


def margin_of(evaluation: Any, name: str) -> float:
    margin = evaluation.max_regression
    return float(margin if isinstance(margin, (int, float)) else getattr(margin, name))


def judge(metrics: dict[str, Any], evaluation: Any, baseline_metrics: Optional[dict[str, Any]] = None,
          baseline_version: Optional[int] = None, comparison: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Blessing dict {blessed, verdict, reasons, checks, comparison}; `evaluation` is the config's EvaluationConfig.
    `comparison` is models.metrics.paired_comparison of candidate and stable on these examples; without it (only
    the stable model's stored figures) the point differences are held to the margin, as before."""
    checks, reasons = [], []
    for name in GATED_METRICS:
        value = metrics.get(name)
        threshold = float(getattr(evaluation.thresholds, name))
        passed = value is not None and value >= threshold
        checks.append({"metric": name, "kind": "absolute", "value": value, "threshold": threshold, "passed": passed})
        if value is None:
            reasons.append(f"{name} is undefined on this split (every class needs positives and negatives)")
        elif not passed:
            reasons.append(f"{name} {value:.4f} is below the threshold {threshold:.4f}")
    safety_checks(metrics, evaluation.thresholds, checks, reasons)
    study_checks(metrics, evaluation.thresholds, checks, reasons)
    insufficient = False
    if baseline_metrics is not None:
        which = f"the {STABLE_LABEL} model" + (f" (version {baseline_version})" if baseline_version else "")
        if comparison is not None and not comparison["sufficient"]:
            insufficient = True
            reasons.append(f"insufficient evidence to compare with {which}: {comparison['n']} images, fewer than "
                           f"evaluation.min_paired_examples={comparison['min_examples']} (add images to the golden "
                           "set or the test split; docs/operations.md gives the size a margin needs)")
        elif comparison is not None:
            non_inferiority_checks(comparison, evaluation, which, checks, reasons)
        else:
            point_regression_checks(metrics, baseline_metrics, evaluation, which, checks, reasons)
    blessed = not insufficient and all(check["passed"] for check in checks)
    return {
        "blessed": blessed,
        "verdict": INSUFFICIENT if insufficient else BLESSED if blessed else NOT_BLESSED,
        "reasons": reasons,
        "checks": checks,
        "comparison": comparison,
        "baseline": None if baseline_metrics is None else {"label": STABLE_LABEL, "version": baseline_version},
        # both sides of the comparison, on the same examples
        "metrics": {"candidate": {name: metrics.get(name) for name in GATED_METRICS},
                    STABLE_LABEL: None if baseline_metrics is None
                    else {name: baseline_metrics.get(name) for name in GATED_METRICS}},
    }


def non_inferiority_checks(comparison: dict, evaluation: Any, which: str, checks: list, reasons: list) -> None:
    n, p_value = comparison["n"], comparison["mcnemar"]["p_value"]
    for name in GATED_METRICS:
        row = comparison["metrics"].get(name) or {}
        if row.get("difference") is None:
            continue  # undefined for one of the two (a class without positives); the absolute check already said so
        margin = margin_of(evaluation, name)
        passed = row["non_inferior"] is True
        checks.append({"metric": name, "kind": "non_inferiority", "difference": row["difference"],
                       "lower": row["lower"], "upper": row["upper"], "margin": margin, "n": n, "passed": passed})
        if not passed:
            reasons.append(f"{name}: candidate - {which} = {row['difference']:+.4f}, one-sided 95% lower bound "
                           f"{row['lower']:+.4f} on {n} paired images, does not rule out a regression larger than "
                           f"the margin {margin:g} (McNemar p={p_value:.3g})")


def point_regression_checks(metrics: dict, baseline_metrics: dict, evaluation: Any, which: str, checks: list,
                            reasons: list) -> None:
    for name in GATED_METRICS:
        value, reference = metrics.get(name), baseline_metrics.get(name)
        if value is None or reference is None:
            continue  # nothing to compare; an undefined value already failed the absolute check
        delta = margin_of(evaluation, name)
        limit = float(reference) - delta
        passed = value >= limit
        checks.append({"metric": name, "kind": "regression", "value": value, "baseline": reference,
                       "max_regression": delta, "threshold": limit, "passed": passed})
        if not passed:
            reasons.append(f"{name} {value:.4f} is worse than {which}'s {reference:.4f} by more than {delta:g}")


def safety_checks(metrics: dict[str, Any], thresholds: Any, checks: list, reasons: list) -> None:
    """max_ece, min_ood_auroc and min_ood_flagged, when configured (None = not gated). A gated OOD figure without
    probe sets fails: the gate cannot vouch for what was not measured."""
    max_ece = getattr(thresholds, "max_ece", None)
    if max_ece is not None:
        value = metrics.get("ece")
        passed = value is not None and value <= max_ece
        checks.append({"metric": "ece", "kind": "absolute", "direction": "max", "value": value,
                       "threshold": float(max_ece), "passed": passed})
        if not passed:
            reasons.append(f"ece {value:.4f} is above the maximum {max_ece:.4f}" if value is not None
                           else "ece is undefined")
    min_auroc = getattr(thresholds, "min_ood_auroc", None)
    if min_auroc is not None:
        ood = metrics.get("ood") or {}
        value = ood.get("auroc")
        passed = value is not None and value >= min_auroc
        checks.append({"metric": "ood_auroc", "kind": "absolute", "value": value, "threshold": float(min_auroc),
                       "passed": passed})
        if value is None:
            reasons.append("ood_auroc is gated (evaluation.thresholds.min_ood_auroc) but no probe set was evaluated: "
                           "pass --ood DIR to medpipe evaluate" if not ood.get("probe_sets") else
                           "ood_auroc is undefined (the model has no ood_score output)")
        elif not passed:
            reasons.append(f"ood_auroc {value:.4f} is below the threshold {min_auroc:.4f}")
    min_flagged = getattr(thresholds, "min_ood_flagged", None)
    if min_flagged is not None:  # AUROC ignores the threshold; this is what the threshold lets through
        probes = (metrics.get("ood") or {}).get("probe_sets") or []
        if not probes:
            checks.append({"metric": "ood_flagged", "kind": "absolute", "value": None,
                           "threshold": float(min_flagged), "passed": False})
            reasons.append("ood_flagged is gated (evaluation.thresholds.min_ood_flagged) but no probe set was "
                           "evaluated: pass --ood DIR to medpipe evaluate")
        for probe in probes:
            value = probe.get("flagged_out_of_distribution")
            passed = value is not None and value >= min_flagged
            checks.append({"metric": "ood_flagged", "kind": "absolute", "probe_set": probe.get("name"),
                           "value": value, "threshold": float(min_flagged), "passed": passed})
            if not passed:
                reasons.append(f"the OOD guard flags only {value:.4f} of probe set {probe.get('name')}, below "
                               f"{min_flagged:.4f}" if value is not None else
                               f"probe set {probe.get('name')} has no flagged share (no ood_score output)")


def study_checks(metrics: dict[str, Any], thresholds: Any, checks: list, reasons: list) -> None:
    """min_study_sensitivity and min_study_specificity, when configured (None = not gated): the lowest study-level
    figure over the assembled study sizes (medpipe evaluate's `study` section). Gated but not measured fails."""
    study = metrics.get("study") or {}
    for key, figure in (("min_study_sensitivity", "min_sensitivity"), ("min_study_specificity", "min_specificity")):
        floor = getattr(thresholds, key, None)
        if floor is None:
            continue
        value = study.get(figure)
        passed = value is not None and value >= floor
        name = figure.replace("min_", "study_")
        checks.append({"metric": name, "kind": "absolute", "value": value, "threshold": float(floor),
                       "passed": passed})
        if value is None:
            reasons.append(f"{name} is gated (evaluation.thresholds.{key}) but was not measured: the model needs a "
                           "study rule with a normal class (assets/study_rule.json, evaluation.normal_class)")
        elif not passed:
            reasons.append(f"{name} {value:.4f} (lowest over study sizes) is below the threshold {floor:.4f}")


def combine(blessings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One blessing from several evaluations (e.g. the new partition's test split and the golden set): blessed only
    when every one passes its checks and, with a `stable` model, at least one had enough images to compare the two;
    an evaluation with too few images abstains from the comparison (its absolute checks still count). Reasons are
    prefixed with the evaluation's name; each evaluation is kept whole."""
    if not blessings:
        raise ValueError("no evaluation to combine")
    compared = any(blessing.get("baseline") for blessing in blessings.values())
    deciding = [blessing for blessing in blessings.values() if blessing.get("verdict") != INSUFFICIENT]
    checks_pass = all(all(check.get("passed") for check in blessing.get("checks", [])) and
                      blessing.get("verdict", BLESSED if blessing.get("blessed") else NOT_BLESSED) != NOT_BLESSED
                      for blessing in blessings.values())
    insufficient = compared and not deciding
    blessed = checks_pass and not insufficient
    reasons = [f"{name}: {reason}" for name, blessing in blessings.items() for reason in blessing.get("reasons", [])
               if blessing.get("verdict") != INSUFFICIENT or insufficient or not reason.startswith("insufficient")]
    abstained = [name for name, blessing in blessings.items() if blessing.get("verdict") == INSUFFICIENT]
    if abstained and not insufficient:
        reasons.append(f"not compared with {STABLE_LABEL} on {', '.join(abstained)} (too few images); decided on "
                       f"{', '.join(name for name in blessings if name not in abstained)}")
    baselines = [blessing.get("baseline") for blessing in blessings.values() if blessing.get("baseline")]
    return {
        "blessed": blessed,
        "verdict": INSUFFICIENT if insufficient else BLESSED if blessed else NOT_BLESSED,
        "reasons": reasons,
        "baseline": baselines[0] if baselines else None,
        "evaluations": blessings,
        "model": next(iter(blessings.values())).get("model"),
        "data": combined_data(blessings),
    }


def combined_data(blessings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The `data` of a combined verdict, which `medpipe publish` checks: a test split (test, test_shift) only when
    one evaluation is on one and none on data the model was tuned on (train, val, val_shift); external images (a
    golden set) may join."""
    from medpipe.config import GATE_SPLITS

    datas = {name: blessing.get("data") or {} for name, blessing in blessings.items()}
    tuned = [data.get("split") for data in datas.values() if data.get("split") not in (*GATE_SPLITS, "images")]
    tests = [data for data in datas.values() if data.get("split") in GATE_SPLITS]
    base = tests[0] if tests else next(iter(datas.values()))
    split = (tuned[0] or "unrecorded data") if tuned else (base["split"] if tests else "images")
    return {**base, "split": split, "evaluations": datas}


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m models.gate --run RUN_DIR --evaluation NAME=DIR ...`: combine the evaluations' blessing.json into
    RUN_DIR/blessing.json (what `medpipe publish` checks). Exit 0 blessed, 3 not blessed (a verdict, not a crash)."""
    import argparse

    from medpipe.errors import DataError
    from medpipe.files import write_json_atomic

    parser = argparse.ArgumentParser(prog="python -m models.gate", description=main.__doc__)
    parser.add_argument("--run", required=True, help="training run directory")
    parser.add_argument("--evaluation", action="append", required=True, metavar="NAME=DIR",
                        help="an evaluation output folder holding blessing.json (repeatable)")
    args = parser.parse_args(argv)
    blessings = {}
    for item in args.evaluation:
        name, _, folder = item.partition("=")
        path = Path(folder) / "blessing.json"
        if not name or not path.is_file():
            raise DataError(f"--evaluation {item!r}: expected NAME=DIR with DIR/blessing.json (run medpipe evaluate)")
        blessings[name] = json.loads(path.read_text(encoding="utf-8"))
    blessing = combine(blessings)
    target = Path(args.run) / "blessing.json"
    write_json_atomic(target, blessing)
    print(json.dumps({"blessed": blessing["blessed"], "reasons": blessing["reasons"], "blessing": str(target)}))
    return 0 if blessing["blessed"] else 3


# ------------------------------------------------------------------------------------------------ the baseline
@dataclass(frozen=True)
class Baseline:
    version: int
    version_dir: Optional[Path]  # None when the labelled version's folder is missing
    metrics: Optional[dict[str, Any]]  # None when the version has no stored metrics


def find_baseline(repository: str | Path, model_name: str, label: str = STABLE_LABEL) -> Optional[Baseline]:
    """The model published under `label`, or None when the repository has none (the first model)."""
    version = version_labels(read_config(Path(repository) / CONFIG_FILE), model_name).get(label)
    if version is None:
        return None
    version_dir = Path(repository) / model_name / str(version)
    if not version_dir.is_dir():
        return Baseline(version, None, None)
    metrics_file = version_dir / "assets.extra" / BASELINE_METRICS_FILE
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else None
    return Baseline(version, version_dir, metrics)


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
