# pve-janitor: `make demo` and `make test` work on a fresh clone; each creates .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test lint demo bench reliability venv constraints clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,simulator,lint]'
	touch $(STAMP)

# PostgreSQL and MariaDB tests run when those servers answer on 127.0.0.1's default ports
# (tests/conftest.py; JANITOR_TEST_POSTGRES_URL / JANITOR_TEST_MYSQL_URL override the URLs).
test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The dashboard's browser tests (tests/test_ui_browser.py) drive headless Chromium through chromedriver.
# Installed here where missing if we can (root with apt-get: Debian's chromium and chromium-driver);
# otherwise those tests are skipped, naming this command. Never a reason for `make test` to fail.
BROWSER_INSTALL := apt-get install -y chromium chromium-driver
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 || \
	    ! { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	            >/dev/null 2>&1 || echo "make: could not install chromium chromium-driver: the browser tests are skipped" >&2; \
	    else \
	        echo "make: no Chromium/chromedriver: the browser tests are skipped (as root: $(BROWSER_INSTALL))" >&2; \
	    fi; \
	fi

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
