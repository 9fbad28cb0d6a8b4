# StudioNOVA on an NVIDIA GPU.
#   docker build -t studionova .
#   docker run --gpus all -p 7860:7860 -e STUDIONOVA_AUTH=me:secret -v studionova-data:/data -v /path/to/models:/models studionova
# The CMD binds 0.0.0.0, so the app refuses to start without STUDIONOVA_AUTH, unless you publish the
# port on loopback only and say so: -p 127.0.0.1:7860:7860 -e STUDIONOVA_INSECURE=1
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 \
    STUDIONOVA_DATA_DIR=/data STUDIONOVA_MODELS_DIR=/models
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY ui ./ui
COPY app.py ./
COPY workflows ./workflows
RUN pip install . && mkdir -p /data /models

EXPOSE 7860
VOLUME ["/data", "/models"]
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
