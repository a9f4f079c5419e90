#!/usr/bin/env bash
# Install the Debian packages that some tests need, if they are missing.
#
#   postgresql                 server binaries (initdb, pg_ctl, postgres under /usr/lib/postgresql/<v>/bin)
#                              for the RDBStorage tests (tests/services.py: PostgresServer)
#   chromium chromium-driver   headless browser for the HTML-report test
#
# Idempotent: does nothing (and runs no `apt-get update`) when everything is installed.
# When not root, or without apt-get, prints one line naming what is missing and exits 0;
# the tests that need those packages then skip.
set -euo pipefail

PACKAGES=(postgresql chromium chromium-driver)

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${PACKAGES[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
else
    missing=("${PACKAGES[@]}")
fi

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: missing system packages (need root and apt-get to install; dependent tests will skip): ${missing[*]}"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log="$(mktemp -t install-system-deps.XXXXXX.log)"
trap 'rm -f "$log"' EXIT
apt_get() {
    # Output goes to a log that is shown only on failure; wait for a concurrent apt/dpkg instead of failing.
    if ! apt-get -o DPkg::Lock::Timeout=300 "$@" >"$log" 2>&1; then
        echo "install-system-deps: apt-get $* failed:" >&2
        cat "$log" >&2
        exit 1
    fi
}
echo "install-system-deps: installing ${missing[*]}"
start=$SECONDS
apt_get update -qq
# No recommends: chromium would pull in udev, upower, mesa and a printer GUI. A font still comes in through
# fontconfig-config (fonts-dejavu-core or an alternative).
apt_get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-system-deps: done in $((SECONDS - start)) s"
