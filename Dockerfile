# Continuity service image: `docker compose up` builds it (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Dependencies change less often than the code: copy the packaging first for layer caching.
COPY pyproject.toml README.md ./
COPY continuity ./continuity
COPY stream ./stream
COPY learner ./learner
COPY replay ./replay
COPY checkpoints ./checkpoints
COPY benchmarks ./benchmarks
RUN pip install . && rm -rf /src

# An unprivileged user owns the checkpoint directory (a named volume mounts over it and
# takes this ownership on first use).
RUN useradd --system --uid 10001 --home-dir /var/lib/continuity continuity \
    && mkdir -p /var/lib/continuity /etc/continuity \
    && chown continuity:continuity /var/lib/continuity
USER continuity
WORKDIR /var/lib/continuity

EXPOSE 8080
STOPSIGNAL SIGTERM

ENTRYPOINT ["continuity", "serve", "--config", "/etc/continuity/continuity.toml"]
