#!/usr/bin/env bash
# Install the Debian packages the integration tests run for real (each test skips cleanly when its part is absent):
#   prometheus, prometheus-pushgateway, prometheus-alertmanager  observability tests
#   orthanc, orthanc-dicomweb, dcmtk                              the PACS (DIMSE + DICOMweb) tests
#   dicom3tools                                                   dciodvfy: the SR and SC are checked against the IOD
#   chromium, chromium-driver, fonts-dejavu-core                  the viewer's real-browser tests
#   postgresql, redis-server                                      Airflow's metadata DB (and the Celery profile)
#   rsyslog, rsyslog-gnutls                                       the audit trail's syslog-over-TLS receiver (RFC 5425)
# Idempotent and quiet: installs only what is missing; never starts the packages' system services (the tests run
# their own instances on loopback, in temporary folders).
set -euo pipefail

PACKAGES=(prometheus prometheus-pushgateway prometheus-alertmanager orthanc orthanc-dicomweb dcmtk dicom3tools
          chromium chromium-driver fonts-dejavu-core postgresql redis-server rsyslog rsyslog-gnutls)

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
        echo "install_system_deps.sh: need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1
    fi
else
    SUDO=
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || true  # a failed refresh surfaces in the install below
fi
# policy-rc.d-less containers may try to start services; we stop any that did and run our own instances.
if ! output=$($SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1); then
    echo "$output" >&2
    echo "install_system_deps.sh: apt-get install ${missing[*]} failed" >&2
    exit 1
fi
for service in prometheus prometheus-pushgateway prometheus-alertmanager orthanc postgresql redis-server rsyslog; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
        $SUDO systemctl stop "$service" >/dev/null 2>&1 || true
    fi
done
