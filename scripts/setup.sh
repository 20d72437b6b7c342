#!/usr/bin/env bash
# Set up this checkout on a fresh Debian/Ubuntu machine: system packages
# (Mosquitto for the local broker, the Fashion-MNIST data set) and a virtual
# environment in .venv with edge-infer installed. Idempotent.
#   scripts/setup.sh          device + cloud runtime and the tools' progress bars (what the demo needs)
#   scripts/setup.sh dev      ... plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(mosquitto dataset-fashion-mnist)
# dev: systemd-python builds against libsystemd; the service tests boot systemd-nspawn containers;
# the storage tests watch the service's fsyncs with strace
[ "${1:-}" = dev ] && APT_PACKAGES+=(libsystemd-dev pkg-config systemd systemd-container openssl strace)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing ${missing[*]} with apt-get" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    elif command -v sudo >/dev/null; then
        echo "setup: installing ${missing[*]} with sudo apt-get" >&2
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: please install these Debian packages first (as root): apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
extras="device,cloud,tools"
[ "${1:-}" = dev ] && extras="device,cloud,tools,calibrate,dev,fleet"   # fleet: Ansible for tests/fleet
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
# The 20 labelled ImageNet photos of the ImageNet demo and tests: only foolbox's data files are
# used (it is never imported), so none of its own dependencies are installed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "foolbox==3.3.4"
