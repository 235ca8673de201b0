"""models/export.py: the SavedModel answers exactly what the Keras model answers on ingest's pixels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE

tf = pytest.importorskip("tensorflow")

FILES = sorted((SAMPLE / "brain_mri").glob("*/*.jp*g"))[:5] + sorted((SAMPLE / "dicom").glob("CR-*.dcm"))[:1]


@pytest.fixture(scope="module")
def exported(trained_sample_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("export_run") / "run"
    shutil.copytree(trained_sample_run, run)
    (run / "evaluation").mkdir(exist_ok=True)
    (run / "evaluation" / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "macro_f1": 0.4}))
    (run / "blessing.json").write_text(json.dumps({"blessed": False, "reasons": ["accuracy 0.5 < 0.9"]}))
    from models.export import export_saved_model

    out = export_saved_model(run, tmp_path_factory.mktemp("export") / "1", model_name="brain_mri")
    return run, out


def test_served_answer_equals_keras_on_ingest_pixels(exported):
    from medpipe.imaging import preprocess_bytes
    from models.train import load_run

    run, out = exported
    model, config, _ = load_run(run)
    prepared = [preprocess_bytes(Path(f).read_bytes(), config) for f in FILES]
    loaded = tf.saved_model.load(str(out))
    served = loaded.signatures["serving_default"](image_bytes=tf.constant([p.png for p in prepared]))
    pixels = np.stack([p.pixels for p in prepared]).astype(np.float32)  # what ingest wrote into the TFRecords
    expected = model(pixels, training=False).numpy()
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
    assert served["class_ids"].numpy().tolist() == expected.argmax(axis=1).tolist()
    assert [n.decode() for n in served["class_names"].numpy()] == [config.labels[i] for i in expected.argmax(1)]
    assert served["class_ids"].dtype == tf.int64 and served["probabilities"].dtype == tf.float32

    direct = loaded.signatures["predict_preprocessed"](images=tf.constant(pixels))
    np.testing.assert_allclose(direct["probabilities"].numpy(), expected, atol=1e-5)
    decoded = loaded.signatures["preprocess"](image_bytes=tf.constant([p.png for p in prepared]))["images"]
    np.testing.assert_array_equal(decoded.numpy(), pixels)


def test_signatures_assets_warmup_and_metrics(exported):
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import prediction_log_pb2

    run, out = exported
    proto = saved_model_pb2.SavedModel.FromString((out / "saved_model.pb").read_bytes())
    signatures = proto.meta_graphs[0].signature_def
    default = signatures["serving_default"]
    assert default.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    assert [d.size for d in default.inputs["image_bytes"].tensor_shape.dim] == [-1]
    assert [d.size for d in default.outputs["probabilities"].tensor_shape.dim] == [-1, 4]
    assert default.outputs["class_ids"].dtype == tf.int64.as_datatype_enum
    assert [d.size for d in signatures["predict_preprocessed"].inputs["images"].tensor_shape.dim] == [-1, 64, 64, 1]

    assert (out / "assets" / "labels.txt").read_text().split() == ["glioma", "meningioma", "notumor", "pituitary"]
    params = json.loads((out / "assets" / "preprocessing.json").read_text())
    assert {k: params[k] for k in ("image_size", "channels", "task", "labels", "threshold")} == {
        "image_size": 64, "channels": 1, "task": "multiclass",
        "labels": ["glioma", "meningioma", "notumor", "pituitary"], "threshold": None}
    # what the gateway needs to preprocess DICOM exactly as ingest did (brain_mri.yaml's settings)
    assert params["dicom"]["multiframe"] == "middle" and params["ingest"]["max_pixels"] > 0
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(str(out / "assets.extra" / "tf_serving_warmup_requests"))]
    assert 1 <= len(records) <= 1000
    assert records[0].predict_log.request.model_spec.name == "brain_mri"
    assert "image_bytes" in records[0].predict_log.request.inputs
    metrics = json.loads((out / "assets.extra" / "medpipe_metrics.json").read_text())
    assert metrics["accuracy"] == 0.5 and metrics["blessing"]["blessed"] is False


def test_binary_head_uses_the_operating_point():
    from models.export import _head

    probabilities, class_ids = _head(tf.constant([[0.2], [0.35], [0.9]]), "binary", 2, threshold=0.3)
    np.testing.assert_allclose(probabilities.numpy(), [[0.8, 0.2], [0.65, 0.35], [0.1, 0.9]], atol=1e-6)
    assert class_ids.numpy().tolist() == [0, 1, 1]
    _, default_cut = _head(tf.constant([[0.2], [0.35], [0.9]]), "binary", 2, threshold=None)
    assert default_cut.numpy().tolist() == [0, 0, 1]
