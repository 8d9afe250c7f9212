# The two commands a newcomer needs are `make demo` and `make test` (see README.md).
.PHONY: demo test unit lint typecheck pytest coverage mutation mutation-show bootstrap infra-up infra-down infra-status lock clean bench

VENV := .venv/bin

bootstrap:
	@bash infra/bootstrap.sh

demo: bootstrap
	$(VENV)/meltica demo

test: bootstrap lint typecheck pytest

# lint-imports: the layer contracts of meltica/ ([tool.importlinter] in pyproject.toml, drawn in meltica/LAYERS.md).
lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/lint-imports

typecheck: bootstrap
	$(VENV)/mypy

# pytest runs on pytest-xdist workers (`-n auto` in pyproject.toml's addopts: one per CPU); PYTEST_ARGS="-n 0" runs serially.
pytest: bootstrap
	$(VENV)/pytest $(PYTEST_ARGS)

# The unit tests only (no database, broker or Prefect): a quick check while editing.
unit: bootstrap
	$(VENV)/pytest tests/unit $(PYTEST_ARGS)

# The suite with branch coverage of meltica/ (about twice the unit tests' time on Python 3.11, so not part
# of `make test`): per-package figures, and floors for the money path (tests/coverage_floors.py).
coverage: bootstrap
	@mkdir -p out
	$(VENV)/pytest --cov --cov-report= --cov-report=json:out/coverage.json $(PYTEST_ARGS)
	$(VENV)/python tests/coverage_floors.py out/coverage.json

# Mutation testing (mutmut) of meltica/risk and the OMS against their unit tests ([tool.mutmut] in
# pyproject.toml); slow, so separate. mutmut >= 3.8 (the first to support pytest 9) needs click >= 8.4, which
# faust-streaming's pin excludes, so it is not in requirements.lock: uv layers it over .venv for this run
# only (the risk and OMS tests do not import faust). Resumes where it stopped; MUTANTS="meltica.risk.kill_switch*"
# narrows it. Prints the survivors (`make mutation-show NAME=...` shows one) and the score.
MUTMUT := uv run --no-project --python $(VENV)/python --with "mutmut>=3.8,<4" mutmut
mutation: bootstrap
	$(MUTMUT) run --max-children 2 $(MUTANTS)
	@$(MUTMUT) results
	@$(MUTMUT) export-cicd-stats
	@$(VENV)/python tests/mutation_score.py

mutation-show:
	@$(MUTMUT) show $(NAME)

infra-up: bootstrap
	$(VENV)/meltica infra up

infra-down: bootstrap
	$(VENV)/meltica infra down

infra-status: bootstrap
	$(VENV)/meltica infra status

# Re-resolve the pinned set after changing dependencies in pyproject.toml. Versions already pinned in
# requirements.lock are kept; `make lock UPGRADE=NAME` moves one package. Every file of each pinned release
# gets its sha256, so bootstrap installs with hash checking on any platform.
lock:
	uv pip compile pyproject.toml requirements-build.in --extra dev --python-version 3.11 --generate-hashes \
		$(if $(UPGRADE),--upgrade-package $(UPGRADE)) -o requirements.lock

clean: infra-down
	rm -rf .meltica

# Benchmarks print ratios against peers measured in the same run (not part of the tests).
bench: bootstrap
	$(VENV)/python bench/orderbook_bench.py
	$(VENV)/python bench/risk_bench.py
