"""Export a training run as a TF Serving SavedModel whose signatures decode images exactly as training did.

Signatures (docs/DESIGN.md, "SavedModel"):
  serving_default(image_bytes: string[-1])        -> {probabilities float32[-1,C] (calibrated), class_ids int64[-1],
                                                      class_names string[-1], ood_score float32[-1],
                                                      in_distribution bool[-1]}
  explain(image_bytes: string[-1])                -> the same dict + heatmap float32[-1,S,S] (Grad-CAM, 0..1)
  predict_preprocessed(images: float32[-1,S,S,ch]) -> the serving_default dict
  preprocess(image_bytes: string[-1])              -> {images float32[-1,S,S,ch]}  (what the model saw; used by the
                                                      server's request log for pixel histograms)
Probabilities, the OOD score and the heat map come from models.safety.SafeClassifier with the run's temperature and
OOD statistics baked in as constants (the run's calibration.json, ood.json, ood_stats.npz).
The decode is models.preprocessing.decode_image_tensor, the function tf.data used in training, so a client cannot
preprocess differently from training. Labels and preprocessing parameters travel in assets/; warmup requests in
assets.extra/tf_serving_warmup_requests.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

from medpipe.config import TaskConfig
from medpipe.study import RULE_FILE as STUDY_RULE_FILE

log = logging.getLogger(__name__)

SERVING_DEFAULT = "serving_default"
EXPLAIN = "explain"
PREPROCESSED = "predict_preprocessed"
PREPROCESS = "preprocess"
INPUT_BYTES = "image_bytes"
INPUT_IMAGES = "images"
WARMUP_FILE = "tf_serving_warmup_requests"
METRICS_FILE = "medpipe_metrics.json"
MODEL_CARD_FILE = "model_card.json"
MAX_WARMUP_RECORDS = 1000  # TF Serving refuses more


def read_threshold(run_dir: Path) -> float | None:
    """RUN_DIR/operating_point.json: the binary operating point evaluate chose on the val split (None for other
    tasks, or before evaluate); no other file counts."""
    path = run_dir / "operating_point.json"
    return float(json.loads(path.read_text())["threshold"]) if path.is_file() else None


def preprocessing_params(config: TaskConfig, threshold: float | None) -> dict:
    # dicom and ingest: what the gateway needs to run preprocess_bytes exactly as ingest did for this model
    plain = config.to_dict()
    return {"image_size": config.image.size, "channels": config.image.channels, "task": config.task,
            "labels": list(config.labels), "threshold": threshold, "dicom": plain["dicom"],
            "ingest": {key: plain["ingest"][key] for key in ("min_size", "max_pixels", "max_file_mb")}}


def _head(scores, task: str, num_classes: int, threshold: float | None):
    """Model output -> (probabilities [-1, C], class_ids [-1]). A one-unit sigmoid becomes [1-p, p]."""
    import tensorflow as tf

    scores = tf.cast(scores, tf.float32)
    if task == "binary" and scores.shape[-1] == 1 and num_classes == 2:
        positive = scores[:, 0]
        probabilities = tf.stack([1.0 - positive, positive], axis=1)
        cut = 0.5 if threshold is None else threshold
        class_ids = tf.cast(positive >= cut, tf.int64)
    elif task == "binary" and threshold is not None:
        probabilities = scores
        class_ids = tf.cast(scores[:, 1] >= threshold, tf.int64)
    else:
        probabilities = scores
        class_ids = tf.argmax(scores, axis=1, output_type=tf.int64)
    return probabilities, class_ids


def build_archive(model, config: TaskConfig, threshold: float | None, safety_params=None):
    """A keras.export.ExportArchive with the four endpoints (tracked variables, explicit dict outputs)."""
    import keras
    import tensorflow as tf

    from models.preprocessing import decode_image_tensor
    from models.safety import SafeClassifier

    size, channels, labels = config.image.size, config.image.channels, list(config.labels)
    label_table = tf.constant(labels)
    safe = SafeClassifier(model, config.task, len(labels), safety_params, threshold)

    def classify(images, explain=False):
        outputs = safe(images, explain=explain)
        return {**outputs, "class_names": tf.gather(label_table, outputs["class_ids"])}

    def decode_batch(image_bytes):
        return tf.map_fn(lambda b: decode_image_tensor(b, size, channels), image_bytes,
                         fn_output_signature=tf.TensorSpec([size, size, channels], tf.float32))

    archive = keras.export.ExportArchive()
    archive.track(model)
    bytes_spec = [tf.TensorSpec([None], tf.string, name=INPUT_BYTES)]
    archive.add_endpoint(SERVING_DEFAULT, lambda image_bytes: classify(decode_batch(image_bytes)),
                         input_signature=bytes_spec)
    archive.add_endpoint(EXPLAIN, lambda image_bytes: classify(decode_batch(image_bytes), explain=True),
                         input_signature=bytes_spec)
    archive.add_endpoint(
        PREPROCESSED, lambda images: classify(images),
        input_signature=[tf.TensorSpec([None, size, size, channels], tf.float32, name=INPUT_IMAGES)])
    archive.add_endpoint(PREPROCESS, lambda image_bytes: {INPUT_IMAGES: decode_batch(image_bytes)},
                         input_signature=bytes_spec)
    return archive


def synthetic_warmup_images(size: int, channels: int) -> list[bytes]:
    """Valid PNGs at the model's size (black, mid-grey, gradient) when no real images are given."""
    import numpy as np
    import tensorflow as tf

    ramp = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))
    arrays = [np.zeros((size, size), np.uint8), np.full((size, size), 128, np.uint8), ramp]
    return [tf.io.encode_png(np.repeat(a[..., None], channels, axis=2)).numpy() for a in arrays]


def write_warmup(path: Path, model_name: str, images: Sequence[bytes]) -> int:
    """TFRecord of PredictionLog records (one single-image Predict each), as TF Serving replays at load time."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    images = list(images)[:MAX_WARMUP_RECORDS]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for data in images:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SERVING_DEFAULT))
            request.inputs[INPUT_BYTES].CopyFrom(tf.make_tensor_proto([data], dtype=tf.string))
            record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(record.SerializeToString())
    return len(images)


def run_metrics(run_dir: Path) -> dict | None:
    """Evaluation metrics (+ the gate's verdict) to ship with the version, read later by the gate as `stable`."""
    metrics_file = run_dir / "evaluation" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    blessing = read_blessing(run_dir)
    if metrics is None and blessing is None:
        return None
    body = dict(metrics or {})
    if blessing is not None:
        body.setdefault("blessing", blessing)
    return body


def read_blessing(run_dir: Path) -> dict | None:
    """RUN_DIR/blessing.json, which `medpipe evaluate` writes for a test-split verdict only; no other file counts."""
    path = run_dir / "blessing.json"
    return json.loads(path.read_text()) if path.is_file() else None


def export_saved_model(run_dir: str | Path, out_dir: str | Path, model_name: str | None = None,
                       warmup_images: Sequence[bytes] | None = None) -> Path:
    """Write the SavedModel of RUN_DIR into OUT_DIR (which must not exist). Returns OUT_DIR.

    warmup_images: encoded PNG/JPEG bytes for the warmup log; synthetic images at the model's size by default.
    """
    from models import model_card, safety
    from models.train import load_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, config, _schema = load_run(run_dir)
    threshold = read_threshold(run_dir)
    params = safety.require_params(run_dir)
    archive = build_archive(model, config, threshold, params)
    archive.write_out(str(out_dir), verbose=False)

    assets = out_dir / "assets"
    assets.mkdir(exist_ok=True)
    (assets / "labels.txt").write_text("\n".join(config.labels) + "\n", encoding="utf-8")
    (assets / "preprocessing.json").write_text(json.dumps(preprocessing_params(config, threshold), indent=2) + "\n")
    for name in (safety.CALIBRATION_FILE, safety.OOD_FILE):  # what the graph's constants were fitted as
        shutil.copyfile(run_dir / name, assets / name)
    if (run_dir / STUDY_RULE_FILE).is_file():  # how the gateway decides a study (medpipe/study.py)
        shutil.copyfile(run_dir / STUDY_RULE_FILE, assets / STUDY_RULE_FILE)
    else:
        log.warning("%s has no %s: the gateway will not decide studies with this version (refit with "
                    "`python -m models.safety --run %s --data INGEST_DIR`)", run_dir, STUDY_RULE_FILE, run_dir)
    extra = out_dir / "assets.extra"
    images = warmup_images or synthetic_warmup_images(config.image.size, config.image.channels)
    write_warmup(extra / WARMUP_FILE, model_name or config.serving.model_name, images)
    metrics = run_metrics(run_dir)
    if metrics is not None:
        (extra / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    card = model_card.build_model_card(run_dir, config)
    (extra / MODEL_CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    log.info("exported %s to %s (%d classes, size %d, threshold %s)", run_dir, out_dir, len(config.labels),
             config.image.size, threshold)
    return out_dir

