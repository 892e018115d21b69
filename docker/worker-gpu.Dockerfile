# defacegate GPU worker: CUDA PyTorch base + nnunetv2; consumes the `deface` queue with the
# nnU-Net engine. The model folder is mounted read-only at /models (see docker-compose.yml).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DEFACEGATE_CONFIG=/etc/defacegate/config.yaml \
    DEFACEGATE_DEFACE__MODELS_ROOT=/models

RUN groupadd --system --gid 10001 defacegate \
 && useradd --system --uid 10001 --gid defacegate --home-dir /var/lib/defacegate \
      --create-home --shell /usr/sbin/nologin defacegate

WORKDIR /opt/defacegate
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY inference ./inference
COPY anonymizer ./anonymizer
RUN pip install '.[nnunet]'

USER defacegate
VOLUME ["/var/lib/defacegate"]

HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 \
  CMD ["python", "-m", "gateway.health", "--worker"]

CMD ["defacegate", "worker", "--queues", "deface", "--engine", "nnunet"]
