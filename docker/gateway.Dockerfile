# defacegate gateway (and CPU worker) image: slim Python, non-root, anatomical engine only.
# Commands are the same `defacegate` invocations the test suite runs.

# The wheel is built where a C compiler is: it carries gateway/_pdata.c compiled (the C-STORE
# data phase; setup.py). The runtime image below has no compiler.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
COPY inference ./inference
COPY anonymizer ./anonymizer
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -c "import zipfile, glob, sys; names = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]).namelist(); sys.exit(not any(n.startswith('gateway/_pdata') and n.endswith('.so') for n in names))"

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DEFACEGATE_CONFIG=/etc/defacegate/config.yaml

RUN groupadd --system --gid 10001 defacegate \
 && useradd --system --uid 10001 --gid defacegate --home-dir /var/lib/defacegate \
      --create-home --shell /usr/sbin/nologin defacegate

COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
 && mkdir -p /var/lib/defacegate/spool && chown -R defacegate: /var/lib/defacegate
WORKDIR /var/lib/defacegate

USER defacegate
VOLUME ["/var/lib/defacegate"]
EXPOSE 11112 8080

# C-ECHO against the gateway's own SCP: healthy only when it accepts associations.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["python", "-m", "gateway.health"]

CMD ["defacegate", "serve"]
