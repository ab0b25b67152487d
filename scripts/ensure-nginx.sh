#!/usr/bin/env bash
# Installs nginx (Debian's package) when missing: the multi-replica suite
# (bins/muse/tests/replicas.rs) puts it in front of three replicas when
# TEST_DATABASE_URL and TEST_REDIS_URL are set. It is started by the test
# with its own prefix on a loopback port; the package's own service is not
# used.
set -euo pipefail

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
echo "nginx is missing; installing it (Debian package)…" >&2
if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx-light || \
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx
    # The package may start its own server on port 80: the tests do not need it.
    $SUDO service nginx stop >/dev/null 2>&1 || true
else
    echo "Install nginx with your package manager, then retry." >&2
    exit 1
fi
