#!/usr/bin/env bash
# Make sure a Docker engine answers; install and start one (as root) when none does.
# Idempotent: does nothing when `docker info` already works.
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
if ! command -v dockerd >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then echo "no Docker engine answers and I am not root to install one" >&2; exit 1; fi
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null
fi
root=${SLY_DOCKER_ROOT:-/var/lib/sly-ci-docker}
mkdir -p "$root"
nohup dockerd --data-root "$root" >/tmp/sly-dockerd.log 2>&1 &
for i in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then echo "docker engine ready"; exit 0; fi
  sleep 1
done
echo "dockerd did not answer in 60 s; see /tmp/sly-dockerd.log" >&2
tail -n 20 /tmp/sly-dockerd.log >&2 || true
exit 1
