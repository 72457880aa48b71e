# cdn-edge: runs `cdn edge` with the config mounted at /etc/cdn-edge/edge.toml.

# The wheel is built where a C compiler is: edge._logline (edge/_logline.c) makes the access-log
# lines; without it every line is made in Python at several times the CPU.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY edge ./edge
COPY control ./control
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
# The import fails the build if the C line maker did not make it into the wheel.
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && python -c "import edge._logline" \
    && useradd --system --uid 10001 --home-dir /var/lib/cdn-edge --create-home cdn \
    && mkdir -p /etc/cdn-edge \
    && chown cdn /var/lib/cdn-edge
COPY configs/edge.example.toml /etc/cdn-edge/edge.toml

USER cdn
WORKDIR /var/lib/cdn-edge
# Data path and admin listener; set `listen = "0.0.0.0:8080"` in the mounted config to publish.
EXPOSE 8080 9080
ENTRYPOINT ["cdn"]
CMD ["edge", "--config", "/etc/cdn-edge/edge.toml"]
