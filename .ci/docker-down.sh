#!/usr/bin/env bash
# Stop the engine that .ci/docker-up.sh started (and only that one). Idempotent.
# Containers left running are stopped by dockerd itself on SIGTERM.
set -euo pipefail

STATE_DIR="${FLOTILLA_DOCKER_STATE_DIR:-/var/run/flotilla-ci-docker}"
PIDFILE="$STATE_DIR/dockerd.pid"

if [[ ! -f "$STATE_DIR/started-by-us" ]]; then
    echo "docker-down: no engine started by docker-up.sh; nothing to stop" >&2
    exit 0
fi
if [[ -f "$PIDFILE" ]]; then
    pid="$(cat "$PIDFILE")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && { echo "docker-down: dockerd $pid ignored SIGTERM; killing" >&2; kill -KILL "$pid"; }
    fi
fi
rm -f "$STATE_DIR/started-by-us"
echo "docker-down: engine stopped" >&2
