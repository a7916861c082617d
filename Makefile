# pve-janitor: `make demo` and `make test` work on a fresh clone; each creates .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test lint demo bench reliability venv constraints clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,simulator,lint]'
	touch $(STAMP)

# PostgreSQL and MariaDB tests run when those servers answer on 127.0.0.1's default ports
# (tests/conftest.py; JANITOR_TEST_POSTGRES_URL / JANITOR_TEST_MYSQL_URL override the URLs).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Lint, format and type checks; paths and rules are in pyproject.toml ([tool.ruff], [tool.mypy]).
LINT_PATHS := receiver hookscript/pve-janitor-hook tests
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

# The long reliability runs (fault matrix, crash points, fuzzing, load, soak); `make test` runs short versions.
reliability: $(STAMP)
	JANITOR_RELIABILITY=long $(PY) -m pytest tests/reliability $(PYTEST_ARGS)

# Benchmarks report numbers (bench/results.json); they never fail on a slow machine.
bench: $(STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

demo: $(STAMP)
	$(VENV)/bin/pve-janitor demo $(DEMO_ARGS)

# After a deliberate upgrade of the venv that the tests passed with: pin those versions.
constraints: $(STAMP)
	$(PY) .ci/constraints.py >constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache *.egg-info
