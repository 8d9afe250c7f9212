#!/usr/bin/env bash
# Validate infra/compose.yaml the way `docker compose -f infra/compose.yaml config` does.
#
# Uses, in order: the docker compose v2 plugin if installed; else infra/compose-validate, a tiny Go
# program around compose-go (the loader docker compose itself uses), built once with the Go toolchain
# from the Go module proxy into the cache (~20 s cold, instant warm); else Debian's docker-compose 1.29
# (apt-get install docker-compose). Prints the resolved model on stdout; exit 0 when valid.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
file="${1:-$here/compose.yaml}"
state="${MELTICA_STATE_DIR:-$root/.meltica}"
cache="${MELTICA_CACHE_DIR:-$state/cache}"
bin="$cache/bin/compose-validate"

if docker compose version >/dev/null 2>&1; then
    echo "validating with: docker compose ($(docker compose version --short))" >&2
    exec docker compose -f "$file" config
fi

go_bin="$(command -v go || true)"
[[ -z "$go_bin" && -x /usr/local/go/bin/go ]] && go_bin=/usr/local/go/bin/go
if [[ -n "$go_bin" ]]; then
    src="$here/compose-validate"
    stamp="$(cat "$src/main.go" "$src/go.mod" "$src/go.sum" | sha256sum | cut -c1-16)"
    if [[ ! -x "$bin" || "$(cat "$bin.stamp" 2>/dev/null)" != "$stamp" ]]; then
        echo "building compose-validate (compose-go) into $bin ..." >&2
        mkdir -p "$(dirname "$bin")"
        (cd "$src" && GOFLAGS=-mod=mod "$go_bin" build -trimpath -o "$bin.tmp" .)
        mv "$bin.tmp" "$bin"
        echo "$stamp" > "$bin.stamp"
    fi
    echo "validating with: compose-go ($(grep -m1 'compose-spec/compose-go' "$src/go.mod" | awk '{print $NF}'))" >&2
    exec "$bin" "$file"
fi

if ! command -v docker-compose >/dev/null 2>&1; then
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "no compose validator: install the docker compose plugin, Go, or Debian's docker-compose" >&2
        exit 3
    fi
    echo "installing Debian's docker-compose ..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose >&2
fi
echo "validating with: $(docker-compose version --short 2>/dev/null || echo docker-compose)" >&2
exec docker-compose -f "$file" config
