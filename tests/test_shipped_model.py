"""The validated brain MRI model shipped in models/shipped/ (issue 15): a real TF Serving repository entry whose model
card records the recipe's test figures, and whose graph does what the card says on the repository's own sample.

The sample's brain MRI slices come from the same training folder the model was trained on, so they prove nothing
about accuracy; the chest X-rays are another modality and must be refused as "outside intended use".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE

SHIPPED = ROOT / "models" / "shipped"


def shipped_version() -> Path:
    from serving.demo import shipped_version as newest

    version = newest(SHIPPED)
    if version is None:
        pytest.skip("models/shipped/brain_mri holds no version in this checkout (see models/shipped/README.md)")
    return version


def test_shipped_model_is_a_servable_repository_entry_with_its_card():
    version = shipped_version()
    assert (SHIPPED / "models.config").is_file() and "brain_mri" in (SHIPPED / "models.config").read_text()
    size_mb = sum(p.stat().st_size for p in version.rglob("*") if p.is_file()) / 2**20
    assert size_mb < 20, f"the shipped model should stay git-friendly, it is {size_mb:.1f} MB"
    card = json.loads((version / "assets.extra" / "model_card.json").read_text())
    metrics = json.loads((version / "assets.extra" / "medpipe_metrics.json").read_text())
    assert card["model"]["architecture"] == "compact_cnn" and card["model"]["labels"] == [
        "glioma", "meningioma", "notumor", "pituitary"]
    assert metrics["accuracy"] >= 0.95 and metrics["macro_f1"] >= 0.95, "the recipe's test split figures"
    assert card["calibration"]["temperature"] > 0
    assert card["ood"]["probe_sets"], "the OOD threshold was measured against probe sets"
    assert (version / "assets.extra" / "tf_serving_warmup_requests").is_file()


@pytest.mark.slow
def test_shipped_model_refuses_chest_xrays_and_explains_brain_slices():
    tf = pytest.importorskip("tensorflow")
    version = shipped_version()
    loaded = tf.saved_model.load(str(version))
    assert {"serving_default", "explain"} <= set(loaded.signatures)
    xrays = sorted((SAMPLE / "chest_xray").glob("*/*.jp*g"))
    brains = sorted((SAMPLE / "brain_mri").glob("*/*.jp*g"))[::10]
    from medpipe.config import load_config
    from medpipe.imaging import preprocess_bytes

    config = load_config(ROOT / "config" / "brain_mri.yaml")

    def run(paths, signature):
        pngs = [preprocess_bytes(p.read_bytes(), config).png for p in paths]
        return {k: v.numpy() for k, v in loaded.signatures[signature](image_bytes=tf.constant(pngs)).items()}

    flagged = run(xrays, "serving_default")["in_distribution"]
    assert (~flagged).mean() >= 0.9, f"{int((~flagged).sum())} of {len(xrays)} chest X-rays flagged"
    explained = run(brains, "explain")
    assert explained["in_distribution"].mean() >= 0.9
    heatmaps = explained["heatmap"]
    assert heatmaps.shape == (len(brains), config.image.size, config.image.size)
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1 and heatmaps.reshape(len(brains), -1).max(axis=1).min() > 0
