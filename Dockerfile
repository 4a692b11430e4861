# agentq image: one image for every role (migrate, worker, beat, flower, health, demo).
#
#   docker build -t agentq:local .
#   docker run --rm agentq:local health --json
#
# The build stage installs the project into a virtualenv; the runtime stage copies only that
# virtualenv, so neither the source tree nor build tooling ends up in the final image.

FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv
RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src

# Dependencies first, read from pyproject.toml, so editing the code does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt

COPY . .
RUN pip install --no-cache-dir . \
 && test -x /opt/venv/bin/agentq


FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:${PATH}"

RUN groupadd --system --gid 10001 agentq \
 && useradd --system --uid 10001 --gid agentq --home-dir /app --create-home \
        --shell /usr/sbin/nologin agentq

COPY --from=build /opt/venv /opt/venv

# Writable working directory for the non-root user (Celery Beat keeps its schedule file here).
WORKDIR /app
USER 10001:10001

# Flower UI (agentq flower).
EXPOSE 5555

HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["agentq", "health", "--json"]

ENTRYPOINT ["agentq"]
CMD ["worker"]
