#!/usr/bin/env bash
# Stop what `meltica infra up` started — see `meltica infra down --help`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$root/.venv/bin/meltica" infra down "$@"
