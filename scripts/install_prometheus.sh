#!/usr/bin/env bash
# Install the Debian packages `prometheus` (prometheus + promtool) and `prometheus-pushgateway` when missing.
# Idempotent and quiet: does nothing when the binaries are already on PATH.
# Used by .ci/run and by the observability integration tests (which skip when absent).
set -euo pipefail

have_all() {
    command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 \
        && command -v prometheus-pushgateway >/dev/null 2>&1
}
have_all && exit 0

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=sudo
    else
        echo "install_prometheus.sh: need root (or sudo) to apt-get install prometheus" >&2
        exit 1
    fi
else
    SUDO=
fi

export DEBIAN_FRONTEND=noninteractive
# Only refresh the package index when apt does not know the package yet.
if ! apt-cache show prometheus prometheus-pushgateway >/dev/null 2>&1; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || true  # a failed refresh surfaces in the install below
fi
# --no-install-recommends keeps it small; policy-rc.d is not needed: we never start the system service.
# apt's chatter (debconf notices) is shown only when the install fails.
if ! output=$($SUDO apt-get install -y -qq --no-install-recommends prometheus prometheus-pushgateway 2>&1); then
    echo "$output" >&2
    echo "install_prometheus.sh: apt-get install prometheus prometheus-pushgateway failed" >&2
    exit 1
fi
# The package may start a system service in containers with an init; we run our own instances on loopback.
for service in prometheus prometheus-pushgateway; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
        $SUDO systemctl stop "$service" >/dev/null 2>&1 || true
    fi
done
have_all
