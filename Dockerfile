# The image of FinetunerExecutor or, by build argument, of the other executors the flows use (the same code, another
# config.yml): for `docker://` executors, Kubernetes (flows/k8s.yml) and Jina Hub / jcloud (flows/jcloud.yml).
#
#   docker build -t finetuner-executor .                                     # CPU: PyTorch's CPU wheels
#   docker build -t finetuner-executor:cuda --build-arg TORCH=cu130 .        # CUDA 13: run with --gpus all
#   docker build -t finetuner-indexer --build-arg EXECUTOR=indexer.yml .     # VectorIndexer
#   docker build -t finetuner-merger --build-arg EXECUTOR=merger.yml .       # ShardMerger
#   docker run -p 8080:8080 -v "$PWD/workspace:/workspace" finetuner-executor
#
# PyTorch's CUDA wheels carry the CUDA and cuDNN libraries (as nvidia-* wheels, which onnxruntime-gpu uses too), so
# the CUDA image starts from the same python:3.11-slim: the host only needs the NVIDIA driver and container toolkit.

ARG BASE=python:3.11-slim

# hnswlib has no wheels: it compiles here, and only the finished virtual environment goes into the image.
FROM ${BASE} AS build
ARG TORCH=cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt requirements-trackers.txt requirements-engines.txt requirements.lock /tmp/
# The engines' clients (backend: qdrant, milvus) are in the image, so that one image serves every flow.
RUN python -m venv /opt/venv \
    && pip install 'pip>=26' \
    && pip install --extra-index-url "https://download.pytorch.org/whl/${TORCH}" \
        -r /tmp/requirements.txt -r /tmp/requirements-engines.txt -c /tmp/requirements.lock

FROM ${BASE}
ARG EXECUTOR=config.yml
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 JINA_OPTOUT_TELEMETRY=1
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 1000 finetuner \
    && mkdir /workspace \
    && chown finetuner:finetuner /workspace
WORKDIR /app
COPY executor/ executor/
COPY ${EXECUTOR} config.yml
USER finetuner
VOLUME /workspace
EXPOSE 8080
# --native: the executor runs in the container's main process, so an executor that dies (the kernel's OOM killer)
# ends the container, and `docker run --restart unless-stopped` (or Kubernetes, whose manifests jina writes with
# --native and a liveness probe) starts a new one; without it jina's parent process outlives its worker and the
# container stays up, answering nothing. The health check catches a worker that hangs: the port of the default CMD.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["jina", "ping", "executor", "localhost:8080"]
ENTRYPOINT ["jina", "executor", "--native", "--uses", "config.yml"]
CMD ["--port", "8080", "--workspace", "/workspace"]
