#!/usr/bin/env bash
# Installs the one system library the build needs beyond Rust: libpq (the
# PostgreSQL client library that diesel links). Debian/Ubuntu via apt-get.
set -euo pipefail

have_libpq() {
    pkg-config --exists libpq 2>/dev/null && return 0
    [ -e /usr/include/postgresql/libpq-fe.h ] && ls /usr/lib/*/libpq.so >/dev/null 2>&1
}

if have_libpq; then
    exit 0
fi

echo "libpq (PostgreSQL client library) is missing; installing libpq-dev…" >&2
if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq libpq-dev pkg-config
else
    echo "Install the PostgreSQL client library headers (libpq-dev / postgresql-libs / libpq) with your package manager, then retry." >&2
    exit 1
fi
