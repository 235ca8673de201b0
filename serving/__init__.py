"""Serving: publishing to a TF Serving model repository, a TF Serving-compatible server, and the client.

    publish.py     `medpipe publish`: blessed run -> REPO/NAME/<unix seconds>/ (temp folder + rename), models.config,
                   label moves (promote / roll back), reload of a running server over gRPC
    repository.py  the on-disk repository and the text ModelServerConfig (shared with real tensorflow/serving)
    server.py      `medpipe serve`: gRPC PredictionService + ModelService + health; rest.py: TF Serving's REST API;
                   manager.py: polling, version policies, labels, loading; batching.py: server-side batching;
                   metrics.py: Prometheus series of TF Serving + medpipe's
    client.py      `medpipe predict` and predict_images()/predict_files() for clinicians' applications

The same client and publisher work against the real binary. To run the client tests against it:
    docker compose up -d tf-serving            # serves ./models with config/serving/*.config
    medpipe publish --run RUN --repository models --model-name brain_mri --base-path /models/brain_mri
    MEDPIPE_TF_SERVING_GRPC=localhost:8500 .venv/bin/python -m pytest tests/test_client.py
(real TF Serving moves a label only to a loaded version unless --allow_version_labels_for_unavailable_models:
publish first, wait for AVAILABLE, then `medpipe publish --repository models --model-name brain_mri --label stable
--version V --server localhost:8500`).
"""
