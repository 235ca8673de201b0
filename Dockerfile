# syntax=docker/dockerfile:1.7
# One image for every medpipe process: the `medpipe` CLI, Airflow 3 (api-server, scheduler, dag-processor,
# triggerer and the tasks they run) and Apache Beam SDK workers (portable runner, e.g. the compose `flink` profile).
#
#   docker build -t medpipe:latest .
#   docker run --rm medpipe:latest medpipe --help
#   docker run --rm --entrypoint /opt/apache/beam/boot medpipe:latest --worker_pool   # Beam worker pool (port 50000)
#   docker build --target gpu -t medpipe:gpu .          # training on NVIDIA GPUs (Kubernetes/Docker training modes)
#   docker run --rm --gpus all medpipe:gpu medpipe train ...
#
# The dependency tree is the one the tests ran with: requirements.lock (it stands in for Airflow's constraints);
# the `gpu` target installs requirements-gpu.lock (the same pins with tensorflow[and-cuda] and its CUDA wheels).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG BEAM_SDK_IMAGE=apache/beam_python3.11_sdk:2.77.0
# The CUDA libraries come with the nvidia-* wheels of requirements-gpu.lock, so the small `base` flavour suffices;
# the host needs an NVIDIA driver for CUDA 12 and the NVIDIA container toolkit.
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu22.04

# ---- builder: compilers and pip live only here -------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv && pip install --upgrade "pip>=24"
WORKDIR /build
# Dependencies first: this layer is rebuilt only when the lock changes, not on every source edit.
COPY requirements.lock ./
RUN pip install -r requirements.lock \
 # depends on the full `tensorflow` wheel, which would replace tensorflow-cpu: install it alone
 && pip install --no-deps tensorflow-serving-api==2.21.0
# Optional extras for a deployment, e.g. the compose `celery` profile:
#   docker compose build --build-arg EXTRA_PIP_PACKAGES="apache-airflow-providers-celery==<version>"
ARG EXTRA_PIP_PACKAGES=""
RUN if [ -n "$EXTRA_PIP_PACKAGES" ]; then pip install $EXTRA_PIP_PACKAGES; fi
COPY pyproject.toml README.md LICENSE ./
COPY medpipe ./medpipe
COPY beam_pipelines ./beam_pipelines
COPY models ./models
COPY serving ./serving
RUN pip install --no-deps . \
 && python -m pip check | grep -v "tensorflow-serving-api .* requires tensorflow" | (! grep .)

# ---- Beam SDK harness boot binary (lets Beam portable runners use this image as the worker environment) ---------
FROM ${BEAM_SDK_IMAGE} AS beam_sdk

# ---- gpu: the training image for NVIDIA GPUs (`docker build --target gpu -t medpipe:gpu .`) -------------------------
# Defined before `runtime` so that a plain `docker build .` still ends with the CPU runtime image.
# Ubuntu's own Python 3.11 on the CUDA base image: the venv is built and run on the same interpreter.
FROM ${CUDA_IMAGE} AS builder_gpu
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3.11-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv && pip install --upgrade "pip>=24"
WORKDIR /build
COPY requirements-gpu.lock ./
RUN pip install -r requirements-gpu.lock && pip install --no-deps tensorflow-serving-api==2.21.0
COPY pyproject.toml README.md LICENSE ./
COPY medpipe ./medpipe
COPY beam_pipelines ./beam_pipelines
COPY models ./models
COPY serving ./serving
# medpipe declares tensorflow-cpu; here tensorflow[and-cuda] provides the same `tensorflow` package
RUN pip install --no-deps . \
 && python -m pip check | grep -v -e "tensorflow-serving-api .* requires tensorflow" \
      -e "medpipe .* requires tensorflow-cpu" | (! grep .)

FROM ${CUDA_IMAGE} AS gpu
LABEL org.opencontainers.image.title="medpipe-gpu" \
      org.opencontainers.image.description="medpipe with TensorFlow for NVIDIA GPUs (training)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 libgomp1 tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 50000 --gid 0 --create-home --home-dir /home/medpipe --shell /bin/bash medpipe \
 && mkdir -p /data /models /opt/airflow \
 && chown -R 50000:0 /data /models /opt/airflow && chmod -R g+rwX /data /models /opt/airflow
COPY --from=builder_gpu /opt/venv /opt/venv
WORKDIR /opt/medpipe
COPY --chown=50000:0 config ./config
COPY --chown=50000:0 dags ./dags
COPY --chown=50000:0 sample_data ./sample_data
# NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES come from the CUDA base image.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MEDPIPE_HOME=/opt/medpipe \
    MEDPIPE_CONFIG_DIR=/opt/medpipe/config \
    MEDPIPE_DATA_ROOT=/data \
    MEDPIPE_MODEL_REPOSITORY=/models
USER 50000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["medpipe", "train", "--help"]

# ---- runtime: no compilers, no pip cache, a non-root user ---------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="medpipe" \
      org.opencontainers.image.description="Beam ingest, Keras training, TF Serving publishing and Airflow 3 DAGs for medical images" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 tini \
 && rm -rf /var/lib/apt/lists/* \
 # uid 50000 / gid 0: the convention of the official Airflow image, so mounted volumes work the same way
 && useradd --uid 50000 --gid 0 --create-home --home-dir /home/medpipe --shell /bin/bash medpipe \
 && mkdir -p /data /models /opt/airflow \
 && chown -R 50000:0 /data /models /opt/airflow && chmod -R g+rwX /data /models /opt/airflow
COPY --from=builder /opt/venv /opt/venv
COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam
WORKDIR /opt/medpipe
# What tasks read at run time besides the installed package: task configs, DAGs and the demo sample.
COPY --chown=50000:0 config ./config
COPY --chown=50000:0 dags ./dags
COPY --chown=50000:0 sample_data ./sample_data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MEDPIPE_HOME=/opt/medpipe \
    MEDPIPE_CONFIG_DIR=/opt/medpipe/config \
    MEDPIPE_DATA_ROOT=/data \
    MEDPIPE_MODEL_REPOSITORY=/models \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/medpipe/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False
USER 50000
# The image answers quickly when imported correctly (no TensorFlow import for --help).
HEALTHCHECK NONE
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["medpipe", "--help"]

