"""The study decision rule (medpipe/study.py): a tumour slice is never outvoted, images outside intended use take no
part, the operating point comes from the model's assets and is chosen on val for a stated sensitivity; the SR
built from a decision marks the deciding image, lists the excluded ones and names its predecessor."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medpipe import study
from medpipe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("glioma", "meningioma", "notumor", "pituitary")
SHIPPED = ROOT / "models" / "shipped" / "brain_mri"


def rule(point: float = 0.5) -> study.StudyRule:
    return study.StudyRule(study.ABNORMAL_FIRST, LABELS, "notumor", point, 0.98)


def probs(glioma=0.0, meningioma=0.0, pituitary=0.0) -> dict:
    return {"glioma": glioma, "meningioma": meningioma, "pituitary": pituitary,
            "notumor": 1.0 - glioma - meningioma - pituitary}


def test_one_tumour_slice_among_normal_slices_decides_the_study():
    normal = [probs(glioma=0.01)] * 6
    table = normal[:3] + [probs(glioma=0.977, meningioma=0.01)] + normal[3:]
    decision = study.decide(table, [True] * 7, rule(0.5))
    assert decision.class_name == "glioma" and decision.abnormal and decision.decider == 3
    assert decision.probability == pytest.approx(0.977) and decision.abnormal_probability == pytest.approx(0.987)
    # the old `max` aggregation lets the normal slices outvote it: what the issue saw
    assert study.decide(table, [True] * 7, study.explicit_rule("max", LABELS)).class_name == "notumor"


@pytest.mark.parametrize("normals", [0, 1, 5, 50, 500])
def test_adding_normal_slices_never_outvotes_the_tumour_slice(normals):
    rng = np.random.default_rng(normals)
    table = [probs(glioma=float(g)) for g in rng.uniform(0, 0.3, normals)] + [probs(pituitary=0.6)]
    decision = study.decide(table, [True] * len(table), rule(0.5))
    assert decision.class_name == "pituitary" and decision.decider == normals


def test_below_the_operating_point_the_study_is_normal_and_the_most_abnormal_image_decides():
    table = [probs(glioma=0.1), probs(meningioma=0.3), probs(pituitary=0.05)]
    decision = study.decide(table, [True] * 3, rule(0.31))
    assert decision.class_name == "notumor" and decision.abnormal is False and decision.decider == 1
    assert decision.probability == pytest.approx(0.7)
    assert study.decide(table, [True] * 3, rule(0.3)).class_name == "meningioma"  # at the point: abnormal


def test_the_class_is_the_highest_abnormal_class_on_the_most_abnormal_image():
    table = [probs(glioma=0.4, meningioma=0.5), probs(glioma=0.85)]
    decision = study.decide(table, [True, True], rule(0.5))
    assert decision.decider == 0 and decision.class_name == "meningioma"


def test_images_outside_intended_use_take_no_part():
    table = [probs(glioma=0.99), probs(glioma=0.02)]
    mixed = study.decide(table, [False, True], rule(0.5))
    assert mixed.class_name == "notumor" and mixed.excluded == (0,) and mixed.included == (1,)
    none = study.decide(table, [False, False], rule(0.5))
    assert none.class_name is None and none.probability is None and none.decider is None
    assert none.outside_intended_use and none.excluded == (0, 1)
    # a model without OOD outputs (None): the image counts, it is not called outside
    assert study.decide(table, [None, None], rule(0.5)).class_name == "glioma"


def test_choose_operating_point_keeps_the_sensitivity_on_the_split():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(0.3, 1.0, 200), rng.uniform(0.0, 0.4, 100)])
    abnormal = np.arange(300) < 200
    chosen = study.choose_operating_point(scores, abnormal, 0.98)
    point = chosen["operating_point"]
    assert np.mean(scores[abnormal] >= point) >= 0.98 == chosen["sensitivity_target"]
    assert chosen["image_sensitivity"] == pytest.approx(np.mean(scores[abnormal] >= point))
    # the highest such point: the next abnormal score above it would lose the target
    ranked = np.sort(scores[abnormal])
    above = ranked[ranked > point / (1 - study.POINT_MARGIN)]  # past the score that defines the point
    assert np.mean(scores[abnormal] >= above[0]) < 0.98
    with pytest.raises(ValueError, match="both normal and abnormal"):
        study.choose_operating_point(scores[:10], np.ones(10, bool), 0.98)


def test_study_metrics_assemble_k_normal_plus_zero_or_one_abnormal():
    # a perfect separator: every study right at every size; the rule's point is used as stored
    labels = np.array([2] * 30 + [0] * 10 + [3] * 10)
    table = np.array([[0.05, 0.05, 0.85, 0.05]] * 30 + [[0.9, 0.04, 0.03, 0.03]] * 10 + [[0.05, 0.05, 0.1, 0.8]] * 10)
    figures = study.study_metrics(table, labels, None, rule(0.5), sizes=(1, 5, 20), studies=50)
    assert figures["min_sensitivity"] == figures["min_specificity"] == 1.0
    assert set(figures["sizes"]) == {"1", "5", "20"} and figures["sizes"]["20"]["class_right_when_found"] == 1.0
    # one normal image above the point: specificity falls as studies grow (1 of 30 images per draw)
    table[0] = [0.7, 0.0, 0.3, 0.0]
    figures = study.study_metrics(table, labels, None, rule(0.5), sizes=(1, 20), studies=200)
    assert figures["sizes"]["20"]["specificity"] < figures["sizes"]["1"]["specificity"] < 1.0


def test_rule_round_trips_through_assets_and_refuses_what_it_cannot_apply(tmp_path):
    (tmp_path / "assets").mkdir()
    assert study.load_rule(tmp_path) is None
    (tmp_path / "assets" / study.RULE_FILE).write_text(json.dumps(rule(0.42).to_dict()))
    assert study.load_rule(tmp_path) == rule(0.42)
    with pytest.raises(ConfigError, match="normal class"):
        study.StudyRule(study.ABNORMAL_FIRST, LABELS, "NORMAL", 0.5)
    with pytest.raises(ConfigError, match="operating point"):
        study.StudyRule(study.ABNORMAL_FIRST, LABELS, "notumor", None)
    with pytest.raises(ConfigError, match="only max or mean"):
        study.explicit_rule("median", LABELS)


def test_the_shipped_model_carries_its_rule_chosen_on_val_for_the_stated_sensitivity():
    (version,) = [p for p in SHIPPED.iterdir() if p.name.isdigit()]
    shipped = study.load_rule(version)
    assert shipped.rule == study.ABNORMAL_FIRST and shipped.normal_class == "notumor"
    assert shipped.sensitivity_target == 0.98 and 0 < shipped.operating_point < 1
    assert shipped.provenance["image_sensitivity"] >= 0.98 and "val split" in shipped.provenance["chosen_on"]
    card = json.loads((version / "assets.extra" / "model_card.json").read_text())
    assert card["study_rule"]["operating_point"] == shipped.operating_point


# ---- the rule in the gateway's results ---------------------------------------------------------------------------
def _mr(tmp_path, name: str, sop: str):
    import fixtures_adversarial as fa

    path = tmp_path / f"{name}.dcm"
    fa.mr_dicom_from_jpeg(fa.sample_jpegs("glioma", 1)[0], path, study_uid="2.25.900", series_uid="2.25.901",
                          sop_uid=sop)
    return pydicom.dcmread(path, stop_before_pixels=True)


def test_sr_marks_the_deciding_image_lists_excluded_ones_and_names_its_predecessor(tmp_path):
    from types import SimpleNamespace

    from serving.gateway import results

    sources = [_mr(tmp_path, str(i), f"2.25.90{i}1") for i in range(3)]
    items = [SimpleNamespace(probabilities=p, in_distribution=flag, ood_score=score)
             for p, flag, score in ((probs(glioma=0.01), True, 1.0), (probs(glioma=0.9), True, 2.0),
                                    (probs(meningioma=0.9), False, 50.0))]
    decision = results.aggregate(items, rule(0.5))
    finding = results.finding_of(decision, items, "brain_mri", 7, sources)
    sr = results.build_sr(sources, finding, sr_uid="2.25.77", series_uid="2.25.78", codes={}, instance_number=2,
                          predecessor={"sr_uid": "2.25.76", "series_uid": "2.25.78"})
    said = results.read_finding(pydicom.dcmread(io.BytesIO(results.to_bytes(sr))))
    assert said["finding"] == "glioma" and said["probability"] == pytest.approx(0.9)
    assert said["deciding"] == ["2.25.9011"] and said["excluded"] == ["2.25.9021"]
    assert said["predecessors"] == ["2.25.76"] and sr.InstanceNumber == 2
    assert said["ood_score"] == pytest.approx(2.0)  # of the images the finding was drawn from
    hook = results.webhook_payload(finding, {}, "job", supersedes="2.25.76")
    assert hook["deciding_instance"] == "2.25.9011" and hook["excluded_instances"] == ["2.25.9021"]
    assert hook["supersedes"] == "2.25.76" and results.wants_secondary_capture(decision)


def test_a_study_all_outside_intended_use_gets_an_sr_that_says_so_and_no_probability(tmp_path):
    from types import SimpleNamespace

    from serving.gateway import results

    sources = [_mr(tmp_path, "k", "2.25.9101")]
    items = [SimpleNamespace(probabilities=probs(meningioma=0.748), in_distribution=False, ood_score=80.0)]
    decision = results.aggregate(items, rule(0.5))
    finding = results.finding_of(decision, items, "brain_mri", 7, sources)
    said = results.read_finding(pydicom.dcmread(io.BytesIO(results.to_bytes(
        results.build_sr(sources, finding, sr_uid="2.25.81", series_uid="2.25.82", codes={})))))
    assert said["finding"] == results.OUTSIDE_INTENDED_USE and "probability" not in said
    assert said["deciding"] == [] and said["references"] == ["2.25.9101"]
    hook = results.webhook_payload(finding, {}, "job")
    assert hook["class_name"] is None and hook["probability"] is None and hook["probabilities"] == {}
    assert not results.wants_secondary_capture(decision)


def test_the_gate_can_require_study_level_sensitivity_and_specificity():
    from medpipe.config import load_config
    from models.gate import judge

    config = load_config(str(ROOT / "config" / "brain_mri.yaml"),
                         ["evaluation.thresholds.min_study_sensitivity=0.95",
                          "evaluation.thresholds.min_study_specificity=0.9"])
    metrics = {"accuracy": 0.99, "macro_f1": 0.99, "macro_auc": 0.999, "ece": 0.01,
               "study": {"min_sensitivity": 0.97, "min_specificity": 0.85}}
    verdict = judge(metrics, config.evaluation)
    assert not verdict["blessed"] and verdict["reasons"] == [
        "study_specificity 0.8500 (lowest over study sizes) is below the threshold 0.9000"]
    assert judge({**metrics, "study": {"min_sensitivity": 0.97, "min_specificity": 0.95}},
                 config.evaluation)["blessed"]
    unmeasured = judge({key: value for key, value in metrics.items() if key != "study"}, config.evaluation)
    assert not unmeasured["blessed"] and "was not measured" in unmeasured["reasons"][0]
    # not configured: not gated
    assert judge({**metrics, "study": {"min_sensitivity": 0.1, "min_specificity": 0.1}},
                 load_config(str(ROOT / "config" / "brain_mri.yaml")).evaluation)["blessed"]


def test_study_store_numbers_reports_once_per_job_and_expires_old_studies(tmp_path):
    import os

    from serving.gateway.spool import Spool
    from serving.gateway.study_store import StudyStore

    spool, store = Spool(tmp_path), StudyStore(tmp_path)
    assert (tmp_path / "studies").stat().st_mode & 0o777 == 0o700  # PHI kept: the gateway's user only
    first = spool.put("brain_mri", "2.25.1", "2.25.11", "2.25.111", b"DICM-one", "dimse", "aet:X")
    assert store.next_report("brain_mri", first.study_key, "job-a") == (1, None)
    store.record("brain_mri", first.study_key, [first], {"job": "job-a", "sr_uid": "2.25.9", "number": 1})
    store.record("brain_mri", first.study_key, [first], {"job": "job-a", "sr_uid": "2.25.9", "number": 1})  # replay
    assert [i.read() for i in store.instances("brain_mri", first.study_key)] == [b"DICM-one"]
    number, previous = store.next_report("brain_mri", first.study_key, "job-b")
    assert number == 2 and previous["sr_uid"] == "2.25.9"
    store.record("brain_mri", first.study_key, [], {"job": "job-b", "sr_uid": "2.25.10", "number": 2})
    # a replay of job-b after a crash: the same number and predecessor as the first attempt
    assert store.next_report("brain_mri", first.study_key, "job-b") == (2, previous)
    state = store.folder("brain_mri", first.study_key) / "state.json"
    os.utime(state, (1000, 1000))
    assert store.expire(older_than=999) == 0 and store.expire(older_than=1001) == 1
    assert store.instances("brain_mri", first.study_key) == []


def test_fit_rule_chooses_on_in_distribution_images_and_falls_back_to_max_without_a_normal_class():
    from medpipe.config import load_config
    from models.study_point import fit_rule

    config = load_config(str(ROOT / "config" / "brain_mri.yaml"))
    labels = np.array([2] * 50 + [0] * 50)
    table = np.zeros((100, 4))
    table[:50, 2] = 0.95
    table[:50, 0] = 0.05
    table[50:, 0] = np.linspace(0.5, 0.99, 50)
    table[50:, 2] = 1 - table[50:, 0]
    inside = np.ones(100, bool)
    inside[50] = False  # the least abnormal tumour image is out of distribution: it does not pull the point down
    rule = fit_rule(config, table, labels, inside, chosen_on="a test split")
    assert rule.rule == study.ABNORMAL_FIRST and rule.normal_class == "notumor"
    assert rule.operating_point == pytest.approx(table[51, 0] * (1 - study.POINT_MARGIN))
    assert rule.provenance["excluded_out_of_distribution"] == 1 and rule.provenance["chosen_on"] == "a test split"
    no_normal = load_config(str(ROOT / "config" / "brain_mri.yaml"), ["evaluation.normal_class=null"])
    assert fit_rule(no_normal, table, labels, inside, chosen_on="x").rule == study.MAX


def test_the_pacs_road_refuses_to_start_without_the_models_assets(tmp_path):
    """Issue 28, "a finding is a class name": without the model repository the road would name findings "0".."N";
    it refuses to start instead, whatever the aggregation."""
    from argparse import Namespace

    from serving.gateway.pacs import start_pacs

    config = tmp_path / "pacs.yaml"
    config.write_text(f"spool: {tmp_path / 'spool'}\nroutes:\n  - model: brain_mri\n    modalities: [MR]\n")
    options = Namespace(results_to="dimse://PACS@127.0.0.1:9", dicom_port=None, pacs_config=str(config),
                        model_repository=None)
    with pytest.raises(ConfigError, match="--model-repository"):
        start_pacs(object(), options)
    config.write_text(f"spool: {tmp_path / 'spool'}\naggregation: max\nroutes:\n  - model: brain_mri\n"
                      "    modalities: [MR]\n")
    with pytest.raises(ConfigError, match="never guesses|--model-repository"):
        start_pacs(object(), options)


@pytest.mark.slow
def test_a_dicom_is_read_as_training_saw_it_with_or_without_a_voi_window():
    """Issue 28: 12-bit MR DICOMs made from 20 sample JPEGs per class get the JPEG's class from the shipped model on
    >= 79 of 80, without a VOI window (the grey pipeline's min..max default; percentiles 0.5/99.5 changed 8) and
    with one."""
    pytest.importorskip("tensorflow")
    from conftest import ROOT, SAMPLE
    from fixtures_adversarial import dicom_parity

    (version,) = [p for p in (ROOT / "models" / "shipped" / "brain_mri").iterdir() if p.name.isdigit()]
    jpegs = [p for label in ("glioma", "meningioma", "notumor", "pituitary")
             for p in sorted((SAMPLE / "brain_mri" / label).glob("*.jp*g"))[:20]]
    parity = dicom_parity(version, jpegs)
    assert parity["images"] == 80 and parity["no_window"] >= 79 and parity["window"] >= 79, parity
