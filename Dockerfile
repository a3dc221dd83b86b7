# The sly-agent image. Task containers are siblings on the host engine: mount the host's docker
# socket and the agent's host dir (see README "Deploy with docker run").
#
#   docker build -t sly-agent:latest .
#   # where no registry is reachable, build a base from this machine's Python first:
#   python3 -m tools.images --python-base && docker build --build-arg BASE=sly-local/python-base:3.11 -t sly-agent .
ARG BASE=python:3.11-slim
FROM ${BASE}

LABEL org.opencontainers.image.title="sly-agent" \
      org.opencontainers.image.description="Node agent that runs ML tasks in Docker"

WORKDIR /opt/sly-agent
COPY requirements-agent.txt ./
# On a local base that already has the requirements this is a no-op that needs no network.
RUN python3 -m pip install --no-cache-dir --disable-pip-version-check -r requirements-agent.txt

# The agent's layers and nothing else (no server/, client/ or tools/): agent -> workers -> node -> protocol.
COPY protocol/ protocol/
COPY node/ node/
COPY workers/ workers/
COPY agent/ agent/

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "agent"]
