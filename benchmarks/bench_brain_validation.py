"""Brain MRI validation that predicts unseen scans (issue 29): near-duplicate groups and the OOD threshold rule.

    MEDPIPE_SHARED_DATA=../shared/data nice -n 19 python benchmarks/bench_brain_validation.py [--work DIR]

Measures, on ../shared/data/brain-tumor-mri/Training and the shipped model (models/shipped/brain_mri, newest version):
1. near-duplicate groups: the 64-bit pHash of every preprocessed slice (beam_pipelines.records.perceptual_hash),
   connected at Hamming distance d = 0..8: groups, images in them, the largest, label-mixed groups, and how many of
   the carved val/test slices have a near-copy in train;
2. the shipped model on its carved val/test split (the split it was trained with: ingest.split_groups=null) and on
   the group-aware part of it (slices with no near-copy in train within d bits), with bootstrap intervals; the
   public test split scored 0.968 (issue 29), the carved test 0.976;
3. the OOD guard: the shipped Mahalanobis score on val, test, the chest X-ray training set and the non-MR DICOM
   objects, and per threshold rule (val quantile, the distribution-free bound, fixed values) the retention and the
   share of each probe set flagged; and the same for multi-layer Mahalanobis scores (features of every block, from
   the shipped weights rebuilt into models.architectures.build_model by variable name).
Targets (issue 29): retention >= 0.99 on in-distribution hold-out, chest X-ray AUROC >= 0.99, ECE <= 0.03.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.bench_safety import non_mr_dicom_folder  # noqa: E402
from benchmarks.common import ROOT, require_shared, run_stage, write_result  # noqa: E402

DISTANCES = (0, 2, 4, 6, 8)
LAYERS = ("stem_relu", "block0_relu2", "block1_relu2", "block2_relu2", "block3_relu2", "gap")
PUBLIC_TEST_ACCURACY = 0.968  # issue 29: the shipped model on the public Testing split (1,208 images)
PUBLIC_TEST_RETENTION = 0.973


def phash_table(source: Path, config) -> tuple[list[str], list[str], object]:
    """(pixel hash, label, pHash) of each distinct preprocessed slice (ingest keeps one copy per pixel hash)."""
    import numpy as np

    from beam_pipelines.records import perceptual_hash
    from medpipe.imaging import preprocess_bytes

    seen: dict[str, tuple[str, int]] = {}
    for path in sorted(source.glob("*/*")):
        prepared = preprocess_bytes(path.read_bytes(), config, encode=False)
        seen.setdefault(prepared.pixel_hash, (path.parent.name, perceptual_hash(prepared.pixels)))
    digests = sorted(seen)
    return digests, [seen[d][0] for d in digests], np.array([seen[d][1] for d in digests], np.uint64)


def near_copy_in(hashes, reference, distance: int):
    import numpy as np

    return (np.bitwise_count(hashes[:, None] ^ reference[None, :]) <= distance).any(axis=1)


def group_figures(digests, labels, hashes, split_of: dict) -> dict:
    from beam_pipelines.records import near_duplicate_groups

    train = hashes[[split_of[d] == "train" for d in digests]]
    out = {}
    for distance in DISTANCES:
        groups = near_duplicate_groups(zip(digests, (int(h) for h in hashes)), distance)
        members: dict[str, list[str]] = {}
        for digest, key in groups.items():
            members.setdefault(key, []).append(labels[digests.index(digest)])
        copies = near_copy_in(hashes, train, distance)
        out[f"d{distance}"] = {
            "groups": len(members), "images": len(groups), "largest": max(map(len, members.values()), default=0),
            "label_mixed": sum(len(set(m)) > 1 for m in members.values()),
            **{f"carved_{s}_with_train_copy": int(sum(c for c, d in zip(copies, digests) if split_of[d] == s))
               for s in ("val", "test")}}
    return out


def bootstrap_ci(correct, samples: int = 1000) -> list[float]:
    import numpy as np

    rng = np.random.default_rng(0)
    means = [correct[rng.integers(0, len(correct), len(correct))].mean() for _ in range(samples)]
    return [round(float(x), 4) for x in np.percentile(means, [2.5, 97.5])]


def shipped_scores(version: Path, images) -> dict:
    import numpy as np
    import tensorflow as tf

    signature = tf.saved_model.load(str(version)).signatures["predict_preprocessed"]
    out: dict[str, list] = {"probabilities": [], "ood_score": []}
    for start in range(0, len(images), 64):
        result = signature(images=tf.constant(images[start:start + 64], tf.float32))
        for key in out:
            out[key].append(result[key].numpy())
    return {key: np.concatenate(value) for key, value in out.items()}


def rebuilt_keras(version: Path, config):
    """The shipped weights in build_model's graph, matched by variable name (every Keras weight must be found)."""
    import tensorflow as tf

    from models.architectures import build_model

    saved = {v.name.split(":")[0]: v for v in tf.saved_model.load(str(version)).variables}
    model = build_model(config, len(config.labels))
    for weight in model.weights:
        weight.assign(saved[weight.path].numpy())
    return model


def layer_features(model, images) -> dict:
    import keras
    import numpy as np

    extractor = keras.Model(model.input, [model.get_layer(name).output for name in LAYERS])
    parts: dict[str, list] = {name: [] for name in LAYERS}
    for start in range(0, len(images), 64):
        for name, tensor in zip(LAYERS, extractor(images[start:start + 64], training=False)):
            value = tensor.numpy()
            parts[name].append(value.mean(axis=(1, 2)) if value.ndim == 4 else value)
    return {name: np.concatenate(value).astype(np.float64) for name, value in parts.items()}


def threshold_table(scores: dict, rules: dict) -> dict:
    """scores: {val, test, test_group_aware, chest, dicom} -> per rule: threshold, retention, flagged shares."""
    import numpy as np

    from models.safety import auroc

    table = {"auroc_chest": round(auroc(scores["test"], scores["chest"]), 5),
             "auroc_dicom": round(auroc(scores["test"], scores["dicom"]), 4)}
    for name, threshold in rules.items():
        table[name] = {"threshold": round(float(threshold), 3),
                       "retention_val": round(float(np.mean(scores["val"] <= threshold)), 4),
                       "retention_test": round(float(np.mean(scores["test"] <= threshold)), 4),
                       "retention_test_group_aware": round(float(np.mean(scores["test_group_aware"] <= threshold)), 4),
                       "chest_flagged": round(float(np.mean(scores["chest"] > threshold)), 4),
                       "dicom_flagged": round(float(np.mean(scores["dicom"] > threshold)), 3)}
    return table


def main(argv=None) -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/bench_brain_validation", help="ingest output and probe links")
    parser.add_argument("--distance", type=int, default=4, help="the pHash distance of the group-aware figures")
    args = parser.parse_args(argv)
    from medpipe.config import load_config
    from medpipe.deid import pseudonym
    from models.evaluate import load_ood_set, load_records
    from models.metrics import calibration, classification_metrics
    from models.safety import fit_mahalanobis, mahalanobis_scores, retention_threshold
    from serving.demo import shipped_version

    brain = require_shared("brain-tumor-mri/Training")
    chest = require_shared("chest-xray-pneumonia/train")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    version = shipped_version(ROOT / "models" / "shipped")
    config = load_config(ROOT / "config" / "brain_mri.yaml", ["ingest.split_groups=null"])  # the shipped split
    data = work / "ingest_carved"
    if not (data / "stats.json").is_file():
        run_stage("beam_pipelines.ingest", ["--config", str(ROOT / "config" / "brain_mri.yaml"), "--set",
                                            "ingest.split_groups=null", "--input", str(brain), "--output",
                                            str(data)], work / "ingest.log")
    digests, labels, hashes = phash_table(brain, config)
    from beam_pipelines.records import assign_split

    split_of = {d: assign_split(d, config.ingest.split_salt, config.ingest.split) for d in digests}
    figures = {"phash_groups": group_figures(digests, labels, hashes, split_of)}

    records = {split: load_records(data, split, config) for split in ("train", "val", "test")}
    # run_stage ingests under a de-identification key: a record's source id is the keyed pseudonym of its pixel hash
    key = os.environ.get("MEDPIPE_DEID_KEY", "benchmark-key-not-a-secret-0000")
    hash_of = {pseudonym(d, key): h for d, h in zip(digests, hashes)}
    train_hashes = np.array([hash_of[i] for i in records["train"].ids], np.uint64)
    aware = {s: ~near_copy_in(np.array([hash_of[i] for i in records[s].ids], np.uint64), train_hashes, args.distance)
             for s in ("val", "test")}
    probes = {"chest": load_ood_set(chest, config).images}
    non_mr_dicom_folder(require_shared("dicom"), work / "ood_non_mr_dicom")
    probes["dicom"] = load_ood_set(work / "ood_non_mr_dicom", config).images
    shipped = {name: shipped_scores(version, ex.images) for name, ex in records.items()}
    shipped.update({name: shipped_scores(version, images) for name, images in probes.items()})

    names = list(config.labels)
    accuracy = {}
    for split in ("val", "test"):
        for part, keep in (("carved", np.ones(len(records[split].labels), bool)), ("group_aware", aware[split])):
            truth, probs = records[split].labels[keep], shipped[split]["probabilities"][keep]
            metrics = classification_metrics(truth, probs, names, bootstrap_samples=0)
            accuracy[f"{split}_{part}"] = {
                "examples": int(keep.sum()), "accuracy": round(metrics["accuracy"], 4),
                "accuracy_ci95": bootstrap_ci((probs.argmax(1) == truth).astype(float)),
                "macro_f1": round(metrics["macro_f1"], 4),
                "f1": {k: round(v["f1"], 3) for k, v in metrics["per_class"].items()},
                "ece": round(calibration(truth, probs, config.evaluation.calibration_bins)["ece"], 4)}
    figures["shipped_accuracy"] = accuracy
    figures["public_test_reference"] = {"accuracy": PUBLIC_TEST_ACCURACY, "retention": PUBLIC_TEST_RETENTION}

    def score_sets(values: dict) -> dict:
        return {**values, "test_group_aware": values["test"][aware["test"]]}

    shipped_ood = score_sets({name: shipped[name]["ood_score"] for name in ("val", "test", "chest", "dicom")})
    val_aware = shipped_ood["val"][aware["val"]]
    rules = {"shipped": json.loads((version / "assets" / "ood.json").read_text())["threshold"],
             "val_quantile_0.99": retention_threshold(shipped_ood["val"], 0.99),
             "val_bound_0.99_c0.95": retention_threshold(shipped_ood["val"], 0.99, 0.95),
             "val_group_aware_bound_0.99_c0.95": retention_threshold(val_aware, 0.99, 0.95),
             "fixed_30": 30.0, "fixed_31": 31.0}
    figures["ood_shipped_gap"] = threshold_table(shipped_ood, rules)

    model = rebuilt_keras(version, config)
    features = {name: layer_features(model, ex.images) for name, ex in records.items()}
    features.update({name: layer_features(model, images) for name, images in probes.items()})
    figures["rebuilt_matches_shipped"] = bool(np.array_equal(
        model.predict(records["test"].images, verbose=0).argmax(1), shipped["test"]["probabilities"].argmax(1)))
    per_layer = {}
    for layer in LAYERS:
        means, whitening = fit_mahalanobis(features["train"][layer], records["train"].labels, len(names))
        per_layer[layer] = score_sets({name: mahalanobis_scores(features[name][layer], means, whitening)
                                       for name in ("val", "test", "chest", "dicom")})
    combos = {"all_layers": LAYERS, "block1_to_gap": LAYERS[2:], "stem+gap": ("stem_relu", "gap"),
              "block2+gap": ("block2_relu2", "gap")}
    multi = {layer: per_layer[layer] for layer in LAYERS}
    for name, combo in combos.items():  # sum of per-layer scores standardised on val
        multi[name] = {key: sum((per_layer[l][key] - per_layer[l]["val"].mean()) / per_layer[l]["val"].std()
                                for l in combo) for key in per_layer["gap"]}
    figures["ood_multi_layer"] = {
        name: threshold_table(scores, {"val_quantile_0.99": retention_threshold(scores["val"], 0.99),
                                       "val_bound_0.99_c0.95": retention_threshold(scores["val"], 0.99, 0.95)})
        for name, scores in multi.items()}
    tail = shipped_ood["test"] > rules["shipped"]
    figures["test_tail_by_class"] = {label: int(np.sum(tail & (records["test"].labels == i)))
                                     for i, label in enumerate(names)}
    figures["shipped_version"] = version.name
    figures["group_aware_distance"] = args.distance
    bound = figures["ood_shipped_gap"]["val_bound_0.99_c0.95"]
    passed = {"group_aware_closer_to_public": abs(accuracy["test_group_aware"]["accuracy"] - PUBLIC_TEST_ACCURACY)
              < abs(accuracy["test_carved"]["accuracy"] - PUBLIC_TEST_ACCURACY),
              "bound_retention": bound["retention_test"] >= 0.99 and bound["retention_test_group_aware"] >= 0.99,
              "auroc_chest": figures["ood_shipped_gap"]["auroc_chest"] >= 0.99}
    write_result("brain_mri_validation", "MEDPIPE_SHARED_DATA=../shared/data nice -n 19 python "
                 "benchmarks/bench_brain_validation.py " + " ".join(argv or sys.argv[1:]), figures, {
                     "group_aware_closer_to_public": "the group-aware test accuracy is closer to the public test "
                                                     "split's 0.968 than the carved test's",
                     "bound_retention": ">= 0.99 of the carved and group-aware test kept at the bound's threshold",
                     "auroc_chest": ">= 0.99 (test vs chest X-ray train)"}, passed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
