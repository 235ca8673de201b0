"""report.html: one self-contained page (images embedded as base64) that a clinician can read without the code.

Pure string building from metrics.json, blessing.json and PNG files: no TensorFlow, no templates engine.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d2430;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ccd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccd;padding:.3em .6em;text-align:right}
th{background:#eef1f6} td.name,th.name{text-align:left}
.verdict{padding:.8em 1em;border-radius:6px;font-weight:600;margin:1em 0}
.blessed{background:#e3f5e6;border:1px solid #3a9a4a} .rejected{background:#fbe6e4;border:1px solid #c0392b}
.muted{color:#5c6778;font-size:.92em} img{max-width:100%;border:1px solid #dde} figure{margin:1em 0}
dl.glossary dt{font-weight:600;margin-top:.5em}
"""

GLOSSARY = [
    ("Sensitivity (recall)", "Of the cases that truly have this finding, the share the model labelled with it. "
                             "Low sensitivity means missed cases."),
    ("Specificity", "Of the cases that do not have this finding, the share the model correctly did not label with it. "
                    "Low specificity means false alarms."),
    ("Precision", "Of the cases the model labelled with this finding, the share that truly have it."),
    ("F1", "The harmonic mean of precision and sensitivity (1 is perfect)."),
    ("ROC AUC", "The probability that the model scores a random case with the finding above a random case without "
                "it (0.5 is chance, 1 is perfect); it does not depend on a threshold."),
    ("Expected calibration error (ECE)", "How far the model's stated confidence is from its actual accuracy, "
                                         "averaged over confidence bins (0 is perfectly calibrated)."),
    ("95% confidence interval", "The range the figure would plausibly take on another sample of the same size "
                                "(bootstrap resampling of the test cases)."),
    ("Grad-CAM", "A heat map of the image regions that most increased the model's score for its answer. It shows "
                 "where the model looked, not why, and is not a segmentation."),
]


def embed_png(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _interval(interval: Optional[Sequence[float]]) -> str:
    return "n/a" if not interval else f"{interval[0]:.3f} to {interval[1]:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f'<th class="{"name" if i == 0 else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"name" if i == 0 else ""}">{cell}</td>' for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _check_row(c: Mapping[str, Any]) -> list[str]:
    result = "pass" if c["passed"] else "<b>fail</b>"
    if c["kind"] == "non_inferiority":  # the paired difference: its bound must clear minus the margin
        return [html.escape(f"{c['metric']} (vs stable model, n={c['n']})"),
                f"{c['difference']:+.4f} (95% lower bound {c['lower']:+.4f})", f"lower bound &ge; {-c['margin']:+.4f}",
                result]
    kind = "vs stable model" if c["kind"] == "regression" else "absolute"
    return [html.escape(f"{c['metric']} ({kind})"), _number(c["value"]),
            f"{'&le;' if c.get('direction') == 'max' else '&ge;'} {_number(c['threshold'])}", result]


def _verdict(blessing: Mapping[str, Any]) -> str:
    if blessing["blessed"]:
        text = "Passed the quality gate: this model may be published."
        reasons = ""
    else:
        text = ("Insufficient evidence to compare with the stable model: not published."
                if blessing.get("verdict") == "insufficient_evidence" else
                "Did not pass the quality gate: this model must not be published without a documented override.")
        reasons = "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in blessing["reasons"]) + "</ul>"
    checks = _table(["check", "value", "required", "result"], [_check_row(c) for c in blessing["checks"]])
    comparison = blessing.get("comparison")
    if comparison:
        mcnemar = comparison["mcnemar"]
        checks += (f"<p>Paired with the stable model on {comparison['n']} images: the candidate alone right on "
                   f"{mcnemar['candidate_only_correct']}, the stable model alone right on "
                   f"{mcnemar['baseline_only_correct']} (McNemar exact p = {mcnemar['p_value']:.3g}).</p>")
    css = "blessed" if blessing["blessed"] else "rejected"
    return f'<div class="verdict {css}">{html.escape(text)}{reasons}</div>{checks}'


def _safety_section(metrics: Mapping[str, Any]) -> list[str]:
    """Calibration (ECE before/after temperature scaling) and the OOD guard on the evaluated data."""
    parts = ["<h2>Calibration and the out-of-distribution guard</h2>"]
    temperature = metrics.get("temperature")
    parts.append(_table(["figure", "value"], [
        ["Temperature (fitted on the val split)", _number(temperature, 4)],
        ["ECE before calibration", _number(metrics.get("ece_uncalibrated"))],
        ["ECE after calibration (served probabilities)", _number(metrics.get("ece"))],
        ["Predictions unchanged by calibration", _number(metrics.get("predictions_unchanged_by_calibration"), 4)],
    ]))
    ood = metrics.get("ood")
    if ood is None:
        parts.append('<p class="muted">This model has no OOD output (exported before the guard existed).</p>')
        return parts
    rows = [["evaluated split: kept in distribution", str(ood["in_distribution_examples"]), "",
             _number(ood["retention"], 4)]]
    rows += [[html.escape(probe["name"]), str(probe["examples"]), _number(probe["auroc"], 4),
              _number(1.0 - probe["flagged_out_of_distribution"], 4)] for probe in ood["probe_sets"]]
    if ood["probe_sets"]:
        rows.append(["all probe sets", str(sum(p["examples"] for p in ood["probe_sets"])), _number(ood["auroc"], 4),
                     ""])
    parts.append(f"<p>An image whose <code>ood_score</code> is above {_number(ood['threshold'])} is answered "
                 "<b>outside intended use</b> instead of a finding.</p>")
    parts.append(_table(["set", "images", "OOD AUROC", "share answered with a finding"], rows))
    return parts


def _study_section(study: Optional[Mapping[str, Any]]) -> list[str]:
    """Study-level figures with the model's own study rule (medpipe/study.py), by study size."""
    if not study:
        return []
    return ["<h2>Studies</h2>",
            f"<p>Rule {html.escape(str(study['rule']))}, operating point {_number(study['operating_point'])}; "
            f"{html.escape(str(study['assembly']))}, {study['studies_per_size']} studies per size (half abnormal). "
            f"Lowest sensitivity {_number(study['min_sensitivity'])}, lowest specificity "
            f"{_number(study['min_specificity'])}.</p>",
            _table(["images per study (k)", "sensitivity", "specificity", "class right when found"],
                   [[k, _number(row["sensitivity"]), _number(row["specificity"]),
                     _number(row["class_right_when_found"])] for k, row in study["sizes"].items()])]


def splits_table(splits: Mapping[str, Any]) -> str:
    """Carved (random) against shift-aware (acquisitions held out of training) figures, one row a split."""
    rows = [[html.escape(name), html.escape(row["kind"]), str(row["examples"])]
            + [f"{_number(row[key]['value'])} {_interval(row[key]['ci95'])}" for key in ("accuracy", "macro_f1",
                                                                                      "macro_auc")]
            for name, row in splits.items()]
    return _table(["split", "kind", "cases", "accuracy (95% CI)", "macro F1 (95% CI)", "ROC AUC (95% CI)"], rows)


def render_model_card(card: Mapping[str, Any]) -> list[str]:
    """The model card section (the same dict as the SavedModel's assets.extra/model_card.json)."""
    use = card.get("intended_use", {})
    parts = ["<h2>Model card</h2>", "<h3>Intended use</h3>", f"<p>{html.escape(str(use.get('use', '')))}</p>",
             f"<p>Users: {html.escape(str(use.get('users', '')))}</p>",
             "<p>Out of scope:</p><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in use.get("out_of_scope", []))
             + "</ul>"]
    data = card.get("training_data") or {}
    rows = [[html.escape(label), str(count), str((data.get("val_examples_per_class") or {}).get(label, ""))]
            for label, count in (data.get("train_examples_per_class") or {}).items()]
    parts += ["<h3>Training data</h3>", _table(["class", "train", "val"], rows),
              f'<p class="muted">Split {html.escape(str(data.get("split", "")))}; {data.get("epochs_run")} epochs.</p>']
    metrics = card.get("metrics")
    if metrics:
        parts += ["<h3>Metrics</h3>", f'<p class="muted">{metrics.get("examples")} cases from '
                  f'{html.escape(str(metrics.get("evaluated_on")))}</p>',
                  _table(["figure", "value", "95% confidence interval"],
                         [[name, _number(metrics[key]["value"]), _interval(metrics[key]["ci95"])]
                          for name, key in (("Accuracy", "accuracy"), ("Macro F1", "macro_f1"),
                                            ("Macro ROC AUC", "macro_auc"))])]
        if metrics.get("by_split"):
            parts += ["<p>By split, at the same operating threshold (carved = random by patient; shift-aware = "
                      "acquisitions held out of training by ingest.shift_holdout):</p>",
                      splits_table(metrics["by_split"])]
    calibration = card.get("calibration")
    if calibration:
        parts += ["<h3>Calibration</h3>", _table(["figure", "value"], [
            ["temperature", _number(calibration.get("temperature"), 4)],
            ["val ECE before / after", f"{_number(calibration.get('val_ece_before'))} / "
                                       f"{_number(calibration.get('val_ece_after'))}"],
            ["test ECE before / after", f"{_number(calibration.get('test_ece_before'))} / "
                                        f"{_number(calibration.get('test_ece_after'))}"]])]
    ood = card.get("ood")
    if ood:
        parts += ["<h3>Out-of-distribution guard</h3>",
                  f"<p>{html.escape(str(ood.get('method')))}: {html.escape(str(ood.get('description')))}. Threshold "
                  f"{_number(ood.get('threshold'))} (keeps {_number(ood.get('val_retention'), 4)} of the val split; "
                  f"{_number(ood.get('test_retention'), 4)} of the evaluated split).</p>",
                  _table(["probe set", "images", "OOD AUROC", "flagged outside intended use"],
                         [[html.escape(str(p["name"])), str(p["examples"]), _number(p["auroc"], 4),
                           _number(p["flagged_out_of_distribution"], 4)] for p in ood.get("probe_sets", [])])
                  if ood.get("probe_sets") else '<p class="muted">No probe set evaluated yet.</p>']
    parts += ["<h3>Known limits</h3>",
              "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in card.get("known_limits", [])) + "</ul>"]
    return parts


def render_report(
    metrics: Mapping[str, Any],
    blessing: Mapping[str, Any],
    plots: Mapping[str, str | Path],
    gradcam_plots: Mapping[str, str | Path],
    context: Mapping[str, Any],
    model_card: Optional[Mapping[str, Any]] = None,
) -> str:
    """The whole page. `plots`: caption -> PNG path; `gradcam_plots`: class label -> PNG path; `context`: model,
    data, split, fingerprints and creation details (shown in a table); `model_card`: models/model_card.py's dict."""
    labels = metrics["labels"]
    ci = metrics["confidence_intervals"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>medpipe evaluation: {html.escape(str(context.get('task_name', '')))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Model evaluation: {html.escape(str(context.get('task_name', '')))}</h1>",
        f'<p class="muted">{metrics["num_examples"]} cases from '
        f'{html.escape(str(context.get("data_description", "")))}; '
        f"classes: {html.escape(', '.join(labels))}. For research and quality assurance; not a medical device.</p>",
        "<h2>Verdict</h2>",
        _verdict(blessing),
        "<h2>Headline figures</h2>",
        _table(
            ["figure", "value", "95% confidence interval"],
            [
                ["Accuracy", _number(metrics["accuracy"]), _interval(ci.get("accuracy"))],
                ["Balanced accuracy", _number(metrics["balanced_accuracy"]), ""],
                ["Macro F1", _number(metrics["macro_f1"]), _interval(ci.get("macro_f1"))],
                ["Weighted F1", _number(metrics["weighted_f1"]), ""],
                ["Macro ROC AUC", _number(metrics["macro_auc"]), _interval(ci.get("macro_auc"))],
                ["Expected calibration error", _number(metrics["ece"]), ""],
            ],
        ),
    ]
    if metrics.get("splits") and len(metrics["splits"]) > 1:
        parts += ["<h2>Carved and shift-aware splits</h2>",
                  "<p>The same model at the same operating threshold on every held-out split. Carved splits are drawn "
                  "at random by patient, so they share acquisition batches with training; shift-aware splits hold "
                  "acquisitions out of training (ingest.shift_holdout) and predict performance on new patients "
                  "better.</p>",
                  splits_table(metrics["splits"])]
    point = metrics.get("operating_point")
    if point:
        parts.append(
            f"<p>Operating threshold {point['threshold']:.3f} for <b>{html.escape(point['positive_label'])}</b>"
            f" ({html.escape(str(point.get('chosen_on', 'default')))}): sensitivity "
            f"{_number(point['sensitivity'])}, specificity {_number(point['specificity'])}.</p>"
        )
    parts += _study_section(metrics.get("study"))
    parts += [
        "<h2>Per class</h2>",
        _table(
            ["class", "cases", "predicted", "sensitivity", "specificity", "precision", "F1", "ROC AUC"],
            [
                [html.escape(label), str(row["support"]), str(row["predicted"]),
                 _number(row["sensitivity"] if row["support"] else None),
                 _number(row["specificity"]), _number(row["precision"]), _number(row["f1"]), _number(row["auc"])]
                for label, row in metrics["per_class"].items()
            ],
        ),
        '<p class="muted">n/a: undefined on this data (sensitivity and ROC AUC of a class with no cases, '
        "specificity when every case has the class). Precision of a class "
        "the model never predicts is shown as 0.</p>",
        "<h2>Confusion matrix</h2>",
        _table(
            ["true \\ predicted", *labels],
            [[html.escape(label), *map(str, row)] for label, row in zip(labels, metrics["confusion_matrix"])],
        ),
    ]
    parts += _safety_section(metrics)
    for caption, path in plots.items():
        parts.append(f"<figure>{embed_png(path, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    if gradcam_plots:
        parts.append("<h2>Where the model looked (Grad-CAM)</h2>")
        parts.append('<p class="muted">For each class, a few correctly and wrongly classified cases; red marks the '
                     "regions that most supported the model's answer.</p>")
        for label, path in gradcam_plots.items():
            parts.append(f"<figure>{embed_png(path, f'Grad-CAM {label}')}<figcaption>true class "
                         f"{html.escape(label)}</figcaption></figure>")
    if model_card:
        parts += render_model_card(model_card)
    parts += [
        "<h2>Provenance</h2>",
        _table(["item", "value"], [[html.escape(str(k)), html.escape(str(v))] for k, v in context.items()]),
        "<h2>Glossary</h2>",
        '<dl class="glossary">' + "".join(f"<dt>{html.escape(t)}</dt><dd>{html.escape(d)}</dd>" for t, d in GLOSSARY)
        + "</dl>",
        "</body></html>",
    ]
    return "\n".join(parts)
