"""The study rule's image-level operating point, chosen on the val split and shipped in the model's assets.

    python -m models.study_point --model REPO/NAME/VERSION --data INGEST_DIR [--split val] [--sensitivity 0.98]

`medpipe train` fits it itself (models.safety.fit_run writes RUN_DIR/study_rule.json; export copies it into
assets/). This command does the same for a published SavedModel trained before the rule existed: it runs the
version's own `predict_preprocessed` signature on the split (decoded as training decoded it), keeps the
in-distribution images, chooses the highest cut on 1 - P(normal) that keeps `--sensitivity` of the abnormal images
(medpipe.study.choose_operating_point) and writes VERSION/assets/study_rule.json (and the `study_rule` section of
assets.extra/model_card.json), refusing to replace one unless --force. The rule's `provenance` says how the point
was chosen; the model card cites it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from medpipe import study
from medpipe.config import TaskConfig
from medpipe.errors import ConfigError

log = logging.getLogger("medpipe.study_point")


def fit_rule(config: TaskConfig, probabilities: np.ndarray, labels: np.ndarray,
             in_distribution: Optional[np.ndarray], chosen_on: str) -> study.StudyRule:
    """The task's study rule from one split's served outputs: abnormal_first with a point when the task has a normal
    class, else `max` (no normal class: no abnormal-first question to ask)."""
    names = tuple(config.labels)
    normal_class = config.evaluation.normal_class
    if normal_class is None:
        return study.StudyRule(rule=study.MAX, labels=names, provenance={"reason": "the task has no normal class"})
    if normal_class not in names:
        raise ConfigError(f"evaluation.normal_class {normal_class!r} is not one of the labels {list(names)}")
    normal = names.index(normal_class)
    keep = np.ones(len(labels), bool) if in_distribution is None else np.asarray(in_distribution, bool)
    probabilities, labels = np.asarray(probabilities, np.float64)[keep], np.asarray(labels)[keep]
    chosen = study.choose_operating_point(1.0 - probabilities[:, normal], labels != normal,
                                          config.evaluation.study_sensitivity)
    point = chosen.pop("operating_point")
    provenance = {**chosen, "chosen_on": chosen_on, "excluded_out_of_distribution": int((~keep).sum()),
                  "method": "highest cut on 1 - P(normal) keeping the sensitivity target of the abnormal "
                            "in-distribution images of the split (medpipe.study.choose_operating_point)"}
    return study.StudyRule(rule=study.ABNORMAL_FIRST, labels=names, normal_class=normal_class,
                           operating_point=point, sensitivity_target=config.evaluation.study_sensitivity,
                           provenance=provenance)


def write_rule(folder: Path, rule: study.StudyRule) -> Path:
    from medpipe.files import write_atomic

    path = Path(folder) / study.RULE_FILE
    write_atomic(path, json.dumps(rule.to_dict(), indent=2) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.study_point", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a published SavedModel version folder (REPO/NAME/VERSION)")
    parser.add_argument("--data", required=True, help="ingest output holding the split (the model's own ingest)")
    parser.add_argument("--split", default="val", help="split to choose on (default val; never the test split)")
    parser.add_argument("--config", required=True, help="the task config the model was trained with")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="replace an existing assets/study_rule.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from models.evaluate import load_records, open_saved_model, resolve_config

    args = build_parser().parse_args(argv)
    if args.split.startswith("test"):
        raise ConfigError("the study operating point is chosen on a validation split, never on a test split")
    model = Path(args.model)
    target = model / "assets" / study.RULE_FILE
    if target.exists() and not args.force:
        raise ConfigError(f"{target} exists; pass --force to replace it")
    predictor = open_saved_model(model)
    config = resolve_config(predictor, args.config, args.overrides)
    examples = load_records(Path(args.data), args.split, config)
    served = predictor.outputs(examples.images)
    rule = fit_rule(config, served["probabilities"], examples.labels, served["in_distribution"],
                    chosen_on=f"the {args.split} split of the model's ingest ({len(examples.labels)} images, "
                              f"fingerprint {examples.fingerprint}), served outputs of version {model.name}")
    path = write_rule(model / "assets", rule)
    card_file = model / "assets.extra" / "model_card.json"
    if card_file.is_file():  # the card says how the version decides a study and how its point was chosen
        from medpipe.files import write_json_atomic
        from models.model_card import study_rule_section

        card = json.loads(card_file.read_text())
        card["study_rule"] = study_rule_section(rule.to_dict())
        write_json_atomic(card_file, card)
    print(json.dumps({"written": str(path), **rule.to_dict()}))
    return 0


if __name__ == "__main__":
    from medpipe.cli import module_main

    module_main(main)
