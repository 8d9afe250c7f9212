#!/usr/bin/env bash
# Start the local infrastructure (PostgreSQL, Apache Kafka) — see `meltica infra up --help`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$root/.venv/bin/meltica" infra up "$@"
