#!/usr/bin/env bash
# Make a Docker engine available: install Debian's docker.io if missing, start dockerd
# in the background if none answers, wait until it does.
#
# Exit status: 0 when an engine answers `docker info`; also 0 (with a message saying
# why) when none can be started, so callers such as CI go on and the docker tests
# skip with that reason. Set DOCKERD_REQUIRED=1 to exit 1 instead.
#
# Environment: DOCKERD_LOG (default /tmp/dockerd.log), DOCKERD_WAIT_S (default 60),
#              DOCKERD_ARGS (extra dockerd arguments).
set -u

log=${DOCKERD_LOG:-/tmp/dockerd.log}
wait_s=${DOCKERD_WAIT_S:-60}

give_up() {
    echo "start-dockerd: no Docker engine: $*" >&2
    [ "${DOCKERD_REQUIRED:-0}" = 1 ] && exit 1
    exit 0
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

if docker info >/dev/null 2>&1; then
    echo "start-dockerd: engine already running ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "start-dockerd: installing Debian's docker.io"
        export DEBIAN_FRONTEND=noninteractive
        as_root apt-get update -q >/dev/null 2>&1 || true
        as_root apt-get install -y -q docker.io >/dev/null 2>&1 || give_up "apt-get install docker.io failed"
    else
        give_up "dockerd is not installed and apt-get is not available"
    fi
fi
# docker-compose (v1, Debian's package) for `docker-compose config`; optional.
if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1 \
        && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q docker-compose >/dev/null 2>&1 \
        || echo "start-dockerd: docker-compose not installed (optional)" >&2
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
    # containerd is started by dockerd itself when none runs.
    echo "start-dockerd: starting dockerd (log: $log)"
    # shellcheck disable=SC2086
    as_root sh -c "nohup dockerd ${DOCKERD_ARGS:-} >'$log' 2>&1 &" || give_up "cannot start dockerd (not root, no sudo)"
fi

for _ in $(seq "$wait_s"); do
    if docker info >/dev/null 2>&1; then
        echo "start-dockerd: engine ready ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
        exit 0
    fi
    sleep 1
done
give_up "dockerd did not answer within ${wait_s}s; last lines of $log:
$(tail -n 20 "$log" 2>/dev/null)"
