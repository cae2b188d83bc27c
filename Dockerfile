# syntax=docker/dockerfile:1
#
# One image for every streamrec process: the API, the stream workers, the trainer, the Spark
# batch driver and one-shot commands. The entry point is the `streamrec` command, so a
# service (or `docker run`) names only the sub-command:
#
#   docker build -t streamrec:0.1.0 .
#   docker run --rm streamrec:0.1.0 config          # every STREAMREC_* setting
#
# Build arguments
#   PYTHON_IMAGE     base image, pinned by tag. Debian bookworm because it ships OpenJDK 17
#                    (PySpark's JVM); trixie only has 21+. Pin a digest (@sha256:…) in a
#                    registry that mirrors it for byte-identical rebuilds.
#   TORCH_INDEX_URL  where torch==$TORCH_VERSION comes from. Default: PyTorch's CPU wheel
#                    index (the stack serves and trains on CPU; the registry's default Linux
#                    build pulls several GB of CUDA libraries). Set it empty for that build:
#                      docker build --build-arg TORCH_INDEX_URL= -t streamrec:0.1.0-cuda .
#                    torch alone is installed from it (like ./run's STREAMREC_TORCH_INDEX),
#                    every other package from PyPI: no package is resolved across two
#                    indexes, which --extra-index-url would do. requirements.lock pins
#                    torch==2.13.0, which 2.13.0+cpu satisfies.
#   UID              of the non-root user. 185 is the user of the official apache/spark
#                    images, so Spark executors and streamrec share the event-log volume.
#
# Layers: the pinned dependencies (requirements.lock + pyproject.toml) are installed before
# the source is copied, so a code change rebuilds only the last, small layers. pip's cache is
# a BuildKit cache mount: pyspark ships as a 456 MB source package and its wheel is built
# once, not on every dependency change.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG PIP_VERSION=25.3
ARG UID=185

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    # The MiniLM weights ship inside a Python package: never reach for the Hugging Face hub.
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# A JRE for PySpark (driver of the batch jobs). The man1 folder: openjdk's post-install
# links its manual pages there, and slim images lack it.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir "pip==${PIP_VERSION}"

WORKDIR /app
COPY requirements.lock pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    fi \
    && pip install -r requirements.lock

# The source last. Editable, so that feature_repo/ (not a package) is found next to
# features/ as in a checkout.
COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && streamrec --help > /dev/null

RUN groupadd --system --gid "${UID}" streamrec \
    && useradd --system --uid "${UID}" --gid streamrec --create-home --home-dir /home/streamrec \
        --shell /usr/sbin/nologin streamrec \
    # The mount points of the compose volumes, owned by the user: a fresh named volume
    # takes the ownership of the folder it is first mounted on.
    && mkdir -p /var/lib/streamrec/offline \
    && chown -R streamrec:streamrec /var/lib/streamrec

ENV STREAMREC_HOME=/var/lib/streamrec
USER streamrec
WORKDIR /home/streamrec
# 8000: the API; 9100: a worker's Prometheus /metrics (with STREAMREC_METRICS_PORT=9100).
EXPOSE 8000 9100
ENTRYPOINT ["streamrec"]
CMD ["--help"]
