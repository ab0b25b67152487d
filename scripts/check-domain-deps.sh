#!/usr/bin/env bash
# Domain crates must be embeddable without the web framework or the ORM.
set -euo pipefail
status=0
for crate in muse-core muse-auth muse-billing muse-inference muse-prompts muse-training muse-gateway; do
    found=$(cargo tree -p "$crate" -e normal --prefix none --offline 2>/dev/null | grep -E '^(actix|diesel)' | sort -u || true)
    if [ -n "$found" ]; then
        echo "error: $crate depends on:" >&2
        echo "$found" >&2
        status=1
    else
        echo "ok: $crate pulls in neither actix nor diesel"
    fi
done
exit $status
