# Continuity service image: `docker compose up` builds it (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Dependencies change less often than the code, so they get a layer of their own, rebuilt only
# when pyproject.toml or constraints.txt change: the runtime dependencies pyproject.toml
# declares (not the dev extra), pinned to the tested versions in constraints.txt.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -c constraints.txt -r requirements.txt
# Then the code, installed without touching the dependencies.
COPY README.md ./
COPY continuity ./continuity
COPY stream ./stream
COPY learner ./learner
COPY replay ./replay
COPY checkpoints ./checkpoints
COPY benchmarks ./benchmarks
RUN pip install --no-deps . && rm -rf /src

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
