# defacegate gateway (and CPU worker) image: slim Python, non-root, anatomical engine only.
# Commands are the same `defacegate` invocations the test suite runs.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DEFACEGATE_CONFIG=/etc/defacegate/config.yaml

RUN groupadd --system --gid 10001 defacegate \
 && useradd --system --uid 10001 --gid defacegate --home-dir /var/lib/defacegate \
      --create-home --shell /usr/sbin/nologin defacegate

WORKDIR /opt/defacegate
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY inference ./inference
COPY anonymizer ./anonymizer
RUN pip install . && mkdir -p /var/lib/defacegate/spool && chown -R defacegate: /var/lib/defacegate

USER defacegate
VOLUME ["/var/lib/defacegate"]
EXPOSE 11112 8080

# C-ECHO against the gateway's own SCP: healthy only when it accepts associations.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["python", "-m", "gateway.health"]

CMD ["defacegate", "serve"]
