"""models/export.py: the SavedModel answers exactly what the in-process model answers on ingest's pixels: calibrated
probabilities, ood_score, in_distribution and the explain heat map, in process and over gRPC and REST."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE

tf = pytest.importorskip("tensorflow")

FILES = (sorted((SAMPLE / "brain_mri").glob("*/*.jp*g"))[:5] + sorted((SAMPLE / "dicom").glob("CR-*.dcm"))[:1]
         + sorted((SAMPLE / "chest_xray").glob("*/*.jp*g"))[:2])


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


def in_process(run: Path, pixels: np.ndarray) -> dict:
    """The reference: the Keras model of the run, with the temperature and OOD statistics applied in numpy
    (independent of models.safety's graph code)."""
    import keras

    from models.safety import calibrated_probabilities, load_params, mahalanobis_scores
    from models.train import load_run

    model, _, _ = load_run(run)
    params = load_params(run)
    features = keras.Model(model.inputs, model.get_layer("gap").output)(pixels, training=False).numpy()
    head = model.get_layer("probs")
    logits = features.astype(np.float64) @ head.kernel.numpy() + head.bias.numpy()
    np.testing.assert_allclose(calibrated_probabilities(logits, 1.0, "softmax"), model(pixels).numpy(), atol=1e-5)
    scores = mahalanobis_scores(features, params.means, params.whitening)
    return {"probabilities": calibrated_probabilities(logits, params.temperature, "softmax"), "ood_score": scores,
            "in_distribution": scores <= params.threshold, "threshold": params.threshold, "model": model}


def prepared(run: Path):
    from medpipe.imaging import preprocess_bytes
    from models.train import load_run

    _, config, _ = load_run(run)
    items = [preprocess_bytes(Path(f).read_bytes(), config) for f in FILES]
    return config, [p.png for p in items], np.stack([p.pixels for p in items]).astype(np.float32)


def assert_same_answer(served: dict, expected: dict, labels) -> None:
    """served outputs (numpy) == the in-process reference; in_distribution compared away from the threshold."""
    np.testing.assert_allclose(served["probabilities"], expected["probabilities"], atol=1e-5)
    assert list(served["class_ids"]) == expected["probabilities"].argmax(axis=1).tolist()
    assert [n.decode() if isinstance(n, bytes) else n for n in served["class_names"]] == \
        [labels[i] for i in expected["probabilities"].argmax(axis=1)]
    np.testing.assert_allclose(served["ood_score"], expected["ood_score"], rtol=1e-4, atol=1e-3)
    clear = np.abs(expected["ood_score"] - expected["threshold"]) > 1e-3
    assert np.array_equal(np.asarray(served["in_distribution"], bool)[clear], expected["in_distribution"][clear])


def test_served_answer_equals_in_process_on_ingest_pixels(exported):
    run, out = exported
    config, pngs, pixels = prepared(run)
    expected = in_process(run, pixels)
    loaded = tf.saved_model.load(str(out))
    served = {k: v.numpy() for k, v in loaded.signatures["serving_default"](image_bytes=tf.constant(pngs)).items()}
    assert_same_answer(served, expected, config.labels)
    assert served["class_ids"].dtype == np.int64 and served["probabilities"].dtype == np.float32
    assert served["ood_score"].dtype == np.float32 and served["in_distribution"].dtype == bool
    # calibration moved the probabilities, not the answer
    raw = expected["model"](pixels).numpy()
    assert not np.allclose(served["probabilities"], raw, atol=1e-3)
    assert served["class_ids"].tolist() == raw.argmax(axis=1).tolist()

    direct = {k: v.numpy() for k, v in loaded.signatures["predict_preprocessed"](images=tf.constant(pixels)).items()}
    assert_same_answer(direct, expected, config.labels)
    decoded = loaded.signatures["preprocess"](image_bytes=tf.constant(pngs))["images"]
    np.testing.assert_array_equal(decoded.numpy(), pixels)

    # explain: the serving_default outputs plus Grad-CAM of the predicted class, equal to the report's code path
    from models.evaluate import open_model

    explained = {k: v.numpy() for k, v in loaded.signatures["explain"](image_bytes=tf.constant(pngs)).items()}
    assert_same_answer(explained, expected, config.labels)
    heatmap = explained["heatmap"]
    assert heatmap.shape == (len(FILES), config.image.size, config.image.size) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0 and heatmap.max() <= 1 + 1e-6
    assert np.allclose(heatmap.reshape(len(FILES), -1).max(axis=1), 1.0)  # each map peaks at 1 (normalised)
    np.testing.assert_allclose(heatmap, open_model(run).explain(pixels), atol=1e-4)


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

    assert [d.size for d in default.outputs["ood_score"].tensor_shape.dim] == [-1]
    assert default.outputs["ood_score"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in default.outputs["in_distribution"].tensor_shape.dim] == [-1]
    assert default.outputs["in_distribution"].dtype == tf.bool.as_datatype_enum
    explain = signatures["explain"]
    assert [d.size for d in explain.outputs["heatmap"].tensor_shape.dim] == [-1, 64, 64]
    assert set(explain.outputs) == set(default.outputs) | {"heatmap"}

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
    for name in ("calibration.json", "ood.json"):
        assert json.loads((out / "assets" / name).read_text()) == json.loads((run / name).read_text())

    card = json.loads((out / "assets.extra" / "model_card.json").read_text())
    assert set(card) >= {"intended_use", "training_data", "metrics", "calibration", "ood", "known_limits"}
    assert card["calibration"]["temperature"] == json.loads((run / "calibration.json").read_text())["temperature"]
    assert card["ood"]["threshold"] == json.loads((run / "ood.json").read_text())["threshold"]
    trained = json.loads((run / "train_metadata.json").read_text())
    assert card["training_data"]["train_examples_per_class"] == trained["train_examples_per_class"]
    assert card["metrics"]["accuracy"]["value"] == 0.5
    assert trained["safety"]["temperature"] == card["calibration"]["temperature"]
    # the study rule, chosen on val at training time, travels with the version and its card
    rule = json.loads((out / "assets" / "study_rule.json").read_text())
    assert rule == json.loads((run / "study_rule.json").read_text())
    assert rule["rule"] == "abnormal_first" and rule["normal_class"] == "notumor" and rule["sensitivity_target"] == 0.98
    assert card["study_rule"]["operating_point"] == rule["operating_point"]


@pytest.mark.slow
def test_grpc_and_rest_answers_equal_in_process(exported, tmp_path):
    """medpipe serve + the official stubs, and REST: serving_default and explain equal the in-process reference."""
    import base64

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from models.evaluate import open_model
    from test_serving import MODEL, post_json, predict_request, publish, start_server, stop_server

    run, _ = exported
    config, pngs, pixels = prepared(run)
    expected = in_process(run, pixels)
    heatmaps = open_model(run).explain(pixels)
    version = publish(run, tmp_path / "models")
    process, grpc_address, rest = start_server(tmp_path / "models", tmp_path)
    try:
        with grpc.insecure_channel(grpc_address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for signature in ("serving_default", "explain"):
                response = stub.Predict(predict_request(pngs, signature=signature), timeout=60)
                assert response.model_spec.version.value == version
                served = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
                assert_same_answer(served, expected, config.labels)
                if signature == "explain":
                    np.testing.assert_allclose(served["heatmap"], heatmaps, atol=1e-4)
        b64 = [{"b64": base64.b64encode(p).decode()} for p in pngs]
        for signature in ("serving_default", "explain"):
            code, body = post_json(f"{rest}/v1/models/{MODEL}:predict", {"signature_name": signature,
                                                                          "instances": b64})
            assert code == 200, body
            rows = body["predictions"]
            served = {key: np.array([row[key] for row in rows]) for key in rows[0]}
            assert served["in_distribution"].dtype == bool
            assert_same_answer(served, expected, config.labels)
            if signature == "explain":
                np.testing.assert_allclose(served["heatmap"], heatmaps, atol=1e-4)
    finally:
        stop_server(process)


def test_binary_head_uses_the_operating_point():
    from models.export import _head

    probabilities, class_ids = _head(tf.constant([[0.2], [0.35], [0.9]]), "binary", 2, threshold=0.3)
    np.testing.assert_allclose(probabilities.numpy(), [[0.8, 0.2], [0.65, 0.35], [0.1, 0.9]], atol=1e-6)
    assert class_ids.numpy().tolist() == [0, 1, 1]
    _, default_cut = _head(tf.constant([[0.2], [0.35], [0.9]]), "binary", 2, threshold=None)
    assert default_cut.numpy().tolist() == [0, 0, 1]
