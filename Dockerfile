# cdn-edge: runs `cdn edge` with the config mounted at /etc/cdn-edge/edge.toml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY edge ./edge
COPY control ./control
RUN pip install --no-cache-dir . \
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
