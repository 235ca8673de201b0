"""Study-level sensitivity and specificity of the shipped brain MRI model by study size, with its own study rule.

    python benchmarks/bench_study.py [--work DIR] [--split val] [--studies 500]

Ingests ../shared/data/brain-tumor-mri/Training with config/brain_mri.yaml (the shipped model's recipe; the split
is by pixel hash, so the val split is the model's own: 525 images) unless WORK/ingest exists, runs the shipped
version's `predict_preprocessed` signature on the split, and assembles studies with medpipe.study.study_metrics:
for each k = 1..20, STUDIES normal studies of k normal images and STUDIES abnormal studies of k normal images plus
one abnormal image (seeded draws), decided by the rule in the version's assets/study_rule.json (abnormal-first,
operating point chosen on that same val split for 0.98 image-level sensitivity: these figures are in-sample for
the point; the test split is kept for `medpipe evaluate`). The `max` aggregation the gateway used before is shown
beside it on the same studies.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, require_shared, run_stage, write_result  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_study"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--studies", type=int, default=500, help="normal and abnormal studies per size")
    args = parser.parse_args(argv)
    from medpipe.config import load_config
    from medpipe.study import explicit_rule, load_rule, study_metrics
    from models.evaluate import load_records, open_saved_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "ingest"
    if not (data / "schema.json").is_file():
        run_stage("beam_pipelines.ingest", ["--config", "config/brain_mri.yaml", "--input",
                                            str(require_shared("brain-tumor-mri/Training")), "--output", str(data)],
                  work / "ingest.log")
    (version,) = [p for p in (ROOT / "models" / "shipped" / "brain_mri").iterdir() if p.name.isdigit()]
    rule = load_rule(version)
    predictor = open_saved_model(version)
    examples = load_records(data, args.split, load_config(str(ROOT / "config" / "brain_mri.yaml")))
    served = predictor.outputs(examples.images)
    figures = {"version": version.name, "split": args.split, "images": int(len(examples.labels)),
               "operating_point": rule.operating_point, "sensitivity_target": rule.sensitivity_target}
    ours = study_metrics(served["probabilities"], examples.labels, served["in_distribution"], rule,
                         studies=args.studies, seed=0)
    old = study_metrics(served["probabilities"], examples.labels, served["in_distribution"],
                        replace(explicit_rule("max", rule.labels), normal_class=rule.normal_class),
                        studies=args.studies, seed=0)
    figures["image_sensitivity_val"] = rule.provenance.get("image_sensitivity")
    figures["image_specificity_val"] = rule.provenance.get("image_specificity")
    figures["studies_per_size"] = ours["studies_per_size"]
    figures["min_study_sensitivity"] = ours["min_sensitivity"]
    figures["min_study_specificity"] = ours["min_specificity"]
    figures["max_rule_min_study_sensitivity"] = old["min_sensitivity"]
    # one row per study size: abnormal-first sensitivity / specificity / right class when found; the old max rule
    figures["by_size"] = {
        f"k={k}": (f"sens {row['sensitivity']:.3f} / spec {row['specificity']:.3f} / class right "
                   f"{row['class_right_when_found']:.3f}; max rule: sens {old['sizes'][k]['sensitivity']:.3f} "
                   f"/ spec {old['sizes'][k]['specificity']:.3f}")
        for k, row in ours["sizes"].items()}
    targets = {"image_sensitivity": f">= {rule.sensitivity_target} on val at the operating point (its definition)",
               "study_specificity": ">= 0.95 at every k"}
    passed = {"image_sensitivity": (figures["image_sensitivity_val"] or 0) >= rule.sensitivity_target,
              "study_specificity": ours["min_specificity"] >= 0.95}
    write_result("study", f"python benchmarks/bench_study.py --split {args.split} --studies {args.studies}",
                 figures, targets, passed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
