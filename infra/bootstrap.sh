#!/usr/bin/env bash
# Installs what Meltica needs on a fresh machine, idempotently: a virtualenv in .venv with the locked
# Python packages (requirements.lock, every file checked against its sha256) and the project itself
# (editable). System packages the broker needs (Java 17, Maven) are installed by `meltica infra up` only
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: Python >= 3.11 is required (found: $("$PYTHON" --version 2>&1 || echo none))" >&2
  exit 2
fi

# uv resolves and installs the locked set in seconds (STACK-NOTES.md); pip installs uv itself.
if ! command -v uv >/dev/null 2>&1 && ! "$PYTHON" -m uv --version >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check uv
fi
UV=(uv)
command -v uv >/dev/null 2>&1 || UV=("$PYTHON" -m uv)

# The report test opens report.html in the system's headless Chromium (Playwright drives it; Playwright's
# own browser download is not used). Installed from the distribution's packages when missing.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing chromium (for the report's browser test)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
  else
    echo "bootstrap: chromium not found; tests/unit/test_report_browser.py will be skipped (apt-get install chromium)" >&2
  fi
fi

stamp=.venv/.meltica-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/meltica ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "${UV[@]}" venv --quiet --python "$PYTHON" .venv
# Hash checking: every locked package must match a sha256 in requirements.lock (`make lock` writes them).
# --no-build: wheels only, because building an sdist would fetch its build backend unchecked; the
# project's own backend (setuptools, wheel) is in the lock, hence --no-build-isolation below.
# PYTHONDONTWRITEBYTECODE is set on these machines: compile once at install, or every start pays ~2 s.
"${UV[@]}" pip sync --quiet --python .venv/bin/python --require-hashes --no-build --compile-bytecode requirements.lock
"${UV[@]}" pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "bootstrap: .venv ready ($(.venv/bin/python --version))"
