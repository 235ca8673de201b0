"""The study decision: one answer for the images of one study, by the rule the model ships in its assets.

    assets/study_rule.json   {"rule": "abnormal_first", "labels": [...], "normal_class": "notumor",
                              "operating_point": 0.0123, "sensitivity_target": 0.98, "chosen_on": "..."}

Rules (`decide`):
- abnormal_first (tasks with a normal class): the study is abnormal when any in-distribution image's abnormal
  probability, 1 - P(normal), reaches the model's image-level operating point (chosen on the val split for a stated
  sensitivity, `choose_operating_point`). The deciding image is the most abnormal one; an abnormal study's class is
  the abnormal class with the highest probability on that image. Normal images can never outvote a tumour slice:
  adding normal slices never lowers the study's abnormal score.
- max / mean: each class's highest (mean) probability over the images, then the highest class. Kept only as
  explicit options of the PACS config; never a default for a task with a normal class.
Images outside the intended use (in_distribution false) take no part: a study is decided on its in-distribution
images and lists the excluded ones; with none left it has no class and no probability (abstention).

Pure (numpy only): the gateway, batch inference and `medpipe predict --study` import it without TensorFlow.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from medpipe.errors import ConfigError

RULE_FILE = "study_rule.json"  # in the SavedModel's assets/
ABNORMAL_FIRST, MAX, MEAN = "abnormal_first", "max", "mean"
RULES = (ABNORMAL_FIRST, MAX, MEAN)
# The point is a val probability computed on float32 outputs; a relative margin keeps the image that defines it
# above the cut when the same image is served again (other batch sizes round differently).
POINT_MARGIN = 1e-4


@dataclass(frozen=True)
class StudyRule:
    rule: str
    labels: tuple[str, ...]
    normal_class: Optional[str] = None
    operating_point: Optional[float] = None  # abnormal_first: image-level cut on 1 - P(normal)
    sensitivity_target: Optional[float] = None
    provenance: dict = field(default_factory=dict)  # how the point was chosen (split, figures): for the model card

    def __post_init__(self):
        if self.rule not in RULES:
            raise ConfigError(f"study rule {self.rule!r} is unknown; expected one of {', '.join(RULES)}")
        if self.rule == ABNORMAL_FIRST:
            if self.normal_class not in self.labels:
                raise ConfigError(f"study rule abnormal_first: normal class {self.normal_class!r} is not one of the "
                                  f"model's labels {list(self.labels)}")
            if self.operating_point is None or not 0.0 <= float(self.operating_point) <= 1.0:
                raise ConfigError("study rule abnormal_first needs an operating point between 0 and 1 (chosen on "
                                  "the val split: `python -m models.study_point`)")

    def to_dict(self) -> dict:
        body = asdict(self)
        body["labels"] = list(self.labels)
        return body


def rule_from_dict(body: Mapping, origin: str = "study rule") -> StudyRule:
    try:
        return StudyRule(rule=str(body["rule"]), labels=tuple(body["labels"]), normal_class=body.get("normal_class"),
                         operating_point=(None if body.get("operating_point") is None
                                          else float(body["operating_point"])),
                         sensitivity_target=body.get("sensitivity_target"),
                         provenance=dict(body.get("provenance") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: not a study rule ({type(exc).__name__}: {exc})") from None


def load_rule(assets: str | Path) -> Optional[StudyRule]:
    """ASSETS/study_rule.json (ASSETS: a SavedModel version folder or its assets/) -> StudyRule; None if absent."""
    folder = Path(assets)
    path = folder / RULE_FILE if (folder / RULE_FILE).is_file() else folder / "assets" / RULE_FILE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    return rule_from_dict(body, origin=str(path))


def explicit_rule(name: str, labels: Sequence[str]) -> StudyRule:
    """max or mean, named by an operator (PACS config `aggregation`)."""
    if name not in (MAX, MEAN):
        raise ConfigError(f"aggregation {name!r}: only max or mean can be named explicitly; the default is the "
                          f"model's own rule")
    return StudyRule(rule=name, labels=tuple(labels))


@dataclass(frozen=True)
class StudyDecision:
    class_name: Optional[str]  # None: no in-distribution image (outside intended use)
    probability: Optional[float]  # the class's probability on the deciding image (max/mean: the aggregate)
    decider: Optional[int]  # index of the deciding image
    abnormal: Optional[bool]  # abnormal_first only
    abnormal_probability: Optional[float]  # 1 - P(normal) of the deciding image (abnormal_first)
    probabilities: dict  # the deciding image's probabilities (max/mean: the per-class aggregate)
    included: tuple[int, ...]
    excluded: tuple[int, ...]  # outside intended use: no class, no probability
    rule: str
    operating_point: Optional[float] = None

    @property
    def outside_intended_use(self) -> bool:
        return self.class_name is None


def decide(probabilities: Sequence[Mapping[str, float]], in_distribution: Sequence[Optional[bool]],
           rule: StudyRule) -> StudyDecision:
    """The study's answer from per-image probabilities (class name -> probability) and OOD flags (None = the model
    has no OOD information: the image counts)."""
    if not probabilities:
        raise ValueError("a study needs at least one image result")
    if len(in_distribution) != len(probabilities):
        raise ValueError("one in_distribution flag per image is needed")
    included = tuple(i for i, flag in enumerate(in_distribution) if flag is not False)
    excluded = tuple(i for i, flag in enumerate(in_distribution) if flag is False)
    base = dict(included=included, excluded=excluded, rule=rule.rule, operating_point=rule.operating_point)
    if not included:
        return StudyDecision(None, None, None, None, None, {}, **base)
    labels = list(rule.labels)
    table = np.array([[float(probabilities[i][name]) for name in labels] for i in included], dtype=np.float64)
    if rule.rule == ABNORMAL_FIRST:
        normal = labels.index(rule.normal_class)
        abnormal_scores = 1.0 - table[:, normal]
        row = int(abnormal_scores.argmax())  # the most abnormal image decides, in either direction
        abnormal = bool(abnormal_scores[row] >= rule.operating_point)
        if abnormal:
            others = [j for j in range(len(labels)) if j != normal]
            best = others[int(table[row, others].argmax())]
        else:
            best = normal
        return StudyDecision(labels[best], float(table[row, best]), included[row], abnormal,
                             float(abnormal_scores[row]), dict(zip(labels, map(float, table[row]))), **base)
    per_class = table.max(axis=0) if rule.rule == MAX else table.mean(axis=0)
    best = int(per_class.argmax())
    row = int(table[:, best].argmax())
    return StudyDecision(labels[best], float(per_class[best]), included[row], None, None,
                         dict(zip(labels, map(float, per_class))), **base)


# ------------------------------------------------------------------------------------------ choosing the point
def choose_operating_point(abnormal_scores: np.ndarray, is_abnormal: np.ndarray, sensitivity: float) -> dict:
    """The highest image-level cut on 1 - P(normal) that keeps at least `sensitivity` of the abnormal images at or
    above it (val split, in-distribution images). Returns the point and what it gives on that split."""
    scores = np.asarray(abnormal_scores, dtype=np.float64)
    positive = np.asarray(is_abnormal, dtype=bool)
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity target must be in (0, 1], got {sensitivity}")
    if positive.sum() == 0 or (~positive).sum() == 0:
        raise ValueError("the split needs both normal and abnormal images to place a study operating point")
    ranked = np.sort(scores[positive])[::-1]
    needed = max(1, math.ceil(sensitivity * len(ranked) - 1e-9))
    point = float(ranked[needed - 1]) * (1.0 - POINT_MARGIN)
    return {"operating_point": point, "sensitivity_target": float(sensitivity),
            "image_sensitivity": float(np.mean(scores[positive] >= point)),
            "image_specificity": float(np.mean(scores[~positive] < point)),
            "abnormal_images": int(positive.sum()), "normal_images": int((~positive).sum())}


def study_metrics(probabilities: np.ndarray, labels: np.ndarray, in_distribution: Optional[np.ndarray],
                  rule: StudyRule, sizes: Sequence[int] = tuple(range(1, 21)), studies: int = 200,
                  seed: int = 0) -> dict:
    """Study-level sensitivity and specificity on studies assembled from one split: for each k, `studies` normal
    studies of k normal images and `studies` abnormal studies of k normal images + 1 abnormal image (drawn with a
    seeded generator). A study is called abnormal when `decide` says a class other than the normal one; an abnormal
    study's class is right when it names the abnormal image's true class. Studies left with no in-distribution image
    count as missed (abnormal) or as not falsely called (normal) and are counted apart."""
    if rule.normal_class is None:
        raise ValueError("study metrics need a task with a normal class")
    names = list(rule.labels)
    normal = names.index(rule.normal_class)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    flags = (np.ones(len(labels), bool) if in_distribution is None else np.asarray(in_distribution, bool))
    normal_ids, abnormal_ids = np.flatnonzero(labels == normal), np.flatnonzero(labels != normal)
    if len(normal_ids) == 0 or len(abnormal_ids) == 0:
        raise ValueError("study metrics need both normal and abnormal images")
    rng = np.random.default_rng(seed)
    rows = [dict(zip(names, map(float, row))) for row in probabilities]

    def called(ids) -> StudyDecision:
        return decide([rows[i] for i in ids], [bool(flags[i]) for i in ids], rule)

    by_size = {}
    for k in sizes:
        replace = k > len(normal_ids)
        true_negative = true_positive = right_class = abstained = 0
        for _ in range(studies):
            normals = rng.choice(normal_ids, size=k, replace=replace)
            decision = called(normals)
            true_negative += decision.class_name in (rule.normal_class, None)
            abstained += decision.class_name is None
            target = int(rng.choice(abnormal_ids))
            ids = np.concatenate([normals, [target]])
            rng.shuffle(ids)
            decision = called(ids)
            hit = decision.class_name not in (rule.normal_class, None)
            true_positive += hit
            right_class += hit and decision.class_name == names[int(labels[target])]
            abstained += decision.class_name is None
        by_size[str(k)] = {"sensitivity": true_positive / studies, "specificity": true_negative / studies,
                           "class_right_when_found": (right_class / true_positive) if true_positive else None,
                           "studies": 2 * studies, "abstained": abstained}
    return {"rule": rule.rule, "operating_point": rule.operating_point, "sizes": by_size,
            "min_sensitivity": min(v["sensitivity"] for v in by_size.values()),
            "min_specificity": min(v["specificity"] for v in by_size.values()),
            "studies_per_size": 2 * studies, "seed": seed,
            "assembly": "k normal images + 0 (normal study) or 1 (abnormal study) abnormal image, k = "
                        f"{min(sizes)}..{max(sizes)}"}
