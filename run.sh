#!/usr/bin/env bash
# sly-agent launcher. See ./run.sh --help.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${SLY_VENV:-$HERE/.venv}

usage() {
  cat <<'TXT'
Usage: ./run.sh [COMMAND] [ARGS...]

  (none) | agent   run the agent in the foreground (Ctrl-C / SIGTERM as documented in README)
                   needs SERVER_ADDRESS and ACCESS_TOKEN; optional AGENT_HOST_DIR, MAX_TASKS, ...
  server [ARGS]    run the reference task server (python -m server ARGS)
  demo [--exit-when-done]
                   the whole thing on embedded defaults: server + agent + a train task; on a fresh
                   machine, as root, it installs and starts what it needs (Docker engine, busybox-static)
  doctor [--no-pull]
                   check this node, one line per check (Docker, GPUs, disk, storage, the server,
                   the token, the clock), with what to do when one fails; exit 1 if any fails
  test [--fast] [PYTEST ARGS]
                   install what the tests need (Docker engine, Chromium, busybox) and run them;
                   without named tests, the server and CLI tests run again, alongside, on a throwaway
                   PostgreSQL (.ci/pg-up.sh; SLY_TEST_DB_URL=URL picks the database, SLY_TEST_PG=0 skips;
                   tests marked any_database run on SQLite only).
                   --fast: only the tests not marked slow (each takes under 2 s), on SQLite
                   (the same as pytest -m "not slow"). SLY_TEST_SERVER=process runs the fixture
                   servers as subprocesses instead of threads of the test process
  lint             ruff (lint and format check) and mypy (protocol/, node/, the server's services), as CI runs them
  screenshots      run the console's browser tests and save their screenshots in docs/screenshots/
                   (plain test runs write them to a temporary dir)

Creates (or reuses) a virtualenv in .venv (SLY_VENV overrides) with requirements.txt installed
(requirements-dev.txt for test and screenshots).
Needs Python 3.11+; the agent, the demo and the tests also need a Docker engine.
TXT
}

die() { echo "run.sh: $*" >&2; exit 1; }

find_python() {
  for py in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}

req_files() {  # $1: a requirements file; prints it and every file it includes (-r), depth first
  local file=$1 line
  echo "$file"
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      -r\ *|--requirement\ *) req_files "$(dirname "$file")/${line#* }" ;;
    esac
  done <"$file"
}

req_hash() {  # $1: a requirements file; keyed by every file it includes, so editing one reinstalls
  req_files "$1" | while IFS= read -r f; do cat "$f"; done | sha256sum | cut -c1-16
}

ensure_venv() {  # $1: requirements file
  local req=$1 py stamp
  py=$(find_python) || die "Python 3.11 or newer is needed and none was found on PATH (set PYTHON=/path/to/python3)."
  if [ ! -x "$VENV/bin/python" ]; then
    "$py" -m venv "$VENV" || die "could not create a virtualenv in $VENV (is the venv module installed?)"
  fi
  stamp="$VENV/.installed-$(basename "$req")-$(req_hash "$HERE/$req")"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/$req" >&2 \
      || die "pip could not install $req"
    touch "$stamp"
  fi
}

ensure_docker() {
  command -v docker >/dev/null 2>&1 || [ -S /var/run/docker.sock ] \
    || die "Docker is not installed (no docker command and no /var/run/docker.sock)."
  "$VENV/bin/python" - <<'PY' || die "the Docker daemon does not answer (is dockerd running, and may this user use /var/run/docker.sock?)."
import sys, docker
try:
    docker.from_env(timeout=5).ping()
except Exception:
    sys.exit(1)
PY
}

docker_answers() {  # the venv's Docker SDK reaches an engine (DOCKER_HOST, else the default socket)
  "$VENV/bin/python" - >/dev/null 2>&1 <<'PY'
import sys, docker
try:
    docker.from_env(timeout=5).ping()
except Exception:
    sys.exit(1)
PY
}

ensure_demo_system() {
  # What the demo needs on a fresh machine, as `test` does: a Docker engine answering (installed
  # with apt-get and started when missing, if we are root) and busybox-static (the demo's task
  # image is built from it). Otherwise one clear instruction.
  local missing=()
  if ! docker_answers; then
    [ -z "${DOCKER_HOST:-}" ] || die "the Docker daemon at DOCKER_HOST=$DOCKER_HOST does not answer."
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  fi
  [ -x /bin/busybox ] || command -v busybox >/dev/null 2>&1 || missing+=(busybox-static)
  if [ ${#missing[@]} -eq 0 ] && docker_answers; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    die "the demo needs a running Docker engine and busybox-static${missing[*]:+ (missing: ${missing[*]})}. Install and start them:
  sudo apt-get install docker.io busybox-static && sudo systemctl start docker
  sudo usermod -aG docker \$USER   # then log in again, so this user may use the engine
(other systems: https://docs.docker.com/engine/install/), or run ./run.sh demo as root: it does that itself."
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 \
      || die "please install ${missing[*]} (no apt-get here; Docker: https://docs.docker.com/engine/install/)."
    echo "run.sh: installing ${missing[*]}" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null || die "apt-get could not install ${missing[*]}."
  fi
  if ! docker_answers; then
    echo "run.sh: starting the Docker engine" >&2
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
      systemctl start docker >/dev/null 2>&1 || true
    fi
    docker_answers || SLY_DOCKER_ROOT=${SLY_DOCKER_ROOT:-/var/lib/docker} bash "$HERE/.ci/docker-up.sh" >&2 \
      || die "the Docker engine did not start (see /tmp/sly-dockerd.log)."
  fi
}

ensure_test_system() {
  # System packages the tests use; installed only when missing (needs root, as CI is).
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  [ -x /bin/busybox ] || command -v busybox >/dev/null 2>&1 || missing+=(busybox-static)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v ps >/dev/null 2>&1 || missing+=(procps)
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "the tests need: ${missing[*]} (install them, or run as root to let me)."
    echo "run.sh: installing ${missing[*]}" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  fi
  bash "$HERE/.ci/docker-up.sh"
}

names_tests() {  # do the pytest arguments name tests (a path or node id under tests/)?
  local a
  for a in "$@"; do
    case "${a#./}" in tests|tests/*|tests::*) return 0 ;; esac
  done
  return 1
}

cmd=${1:-agent}
case "$cmd" in
  -h|--help|help) usage ;;
  agent)
    [ $# -gt 0 ] && shift
    ensure_venv requirements.txt
    ensure_docker
    cd "$HERE"
    exec "$VENV/bin/python" -m agent "$@" ;;
  server)
    shift
    ensure_venv requirements.txt
    cd "$HERE"
    exec "$VENV/bin/python" -m server "$@" ;;
  demo)
    shift
    ensure_venv requirements.txt
    ensure_demo_system
    ensure_docker
    cd "$HERE"
    exec "$VENV/bin/python" -m tools.demo "$@" ;;
  doctor)
    shift
    ensure_venv requirements.txt
    cd "$HERE"
    exec "$VENV/bin/python" -m agent doctor "$@" ;;
  test)
    shift
    ensure_test_system
    ensure_venv requirements-dev.txt
    cd "$HERE"
    # pytest-xdist workers for the fast lane and the whole suite (SLY_TEST_WORKERS=0: one process).
    # More workers than cores: many tests wait on Docker, a lease or a browser, not on a core.
    # worksteal: an idle worker takes queued tests from a busy one, so a few long tests at the
    # end do not leave the other workers idle.
    workers=${SLY_TEST_WORKERS:-3}
    xdist=()
    [ "$workers" = 0 ] || xdist=(-n "$workers" --dist worksteal)
    if [ "${1:-}" = --fast ]; then   # the fast lane: every test not marked slow, on SQLite, servers in threads
      shift
      exec "$VENV/bin/python" -m pytest -m "not slow" "${xdist[@]}" "$@"
    fi
    # Named tests, a database given in SLY_TEST_DB_URL, or SLY_TEST_PG=0: one pytest run.
    if [ -n "${SLY_TEST_DB_URL:-}" ] || [ "${SLY_TEST_PG:-1}" = 0 ] || names_tests "$@"; then
      exec "$VENV/bin/python" -m pytest "$@"
    fi
    # The whole suite on SQLite and, at the same time, the server and CLI tests again on
    # PostgreSQL (those marked any_database left out): the SQLite pass waits on Docker engines,
    # agents and browsers for much of its time, and the PostgreSQL pass fills those gaps. Its
    # output is shown when it ends.
    pg_url=$(SLY_PG_FAST=1 bash "$HERE/.ci/pg-up.sh") \
      || die "could not start PostgreSQL for the tests (.ci/pg-up.sh); SLY_TEST_PG=0 skips that pass"
    pg_log=$(mktemp "${TMPDIR:-/tmp}/sly-test-pg.XXXXXX")
    pg_workers=${SLY_TEST_PG_WORKERS:-2}
    pg_xdist=()
    [ "$pg_workers" = 0 ] || pg_xdist=(-n "$pg_workers" --dist worksteal)
    SLY_TEST_DB_URL=$pg_url "$VENV/bin/python" -m pytest "${pg_xdist[@]}" -m "not any_database" "$@" \
      tests/server tests/cli >"$pg_log" 2>&1 &
    pg_pid=$!
    trap 'kill "$pg_pid" 2>/dev/null || true' EXIT  # an interrupted run leaves no pass behind
    rc=0
    "$VENV/bin/python" -m pytest "${xdist[@]}" "$@" || rc=$?
    pg_rc=0
    wait "$pg_pid" || pg_rc=$?
    echo "run.sh: the server and CLI tests on PostgreSQL ($pg_url), run alongside:" >&2
    cat "$pg_log"
    rm -f "$pg_log"
    [ "$pg_rc" = 0 ] || rc=$pg_rc
    exit $rc ;;
  lint)
    shift
    ensure_venv requirements-dev.txt
    cd "$HERE"
    "$VENV/bin/ruff" check . && "$VENV/bin/ruff" format --check . && "$VENV/bin/mypy" ;;
  screenshots)
    shift
    ensure_test_system
    ensure_venv requirements-dev.txt
    cd "$HERE"
    SLY_SCREENSHOTS="$HERE/docs/screenshots" exec "$VENV/bin/python" -m pytest -q tests/browser "$@" ;;
  *) usage >&2; die "unknown command: $cmd" ;;
esac
