# defacegate — the two set-up commands: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deps-stamp
APT_PACKAGES := dcmtk dicom3tools orthanc chromium redis-server

.PHONY: demo test lint bench system-deps cc clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# nnunetv2 brings torch (from this machine's disk where available) and its stack.
# The install compiles gateway/_pdata.c (the C-STORE data phase, see setup.py).
$(STAMP): pyproject.toml setup.py gateway/_pdata.c | $(BIN)/python cc
	$(BIN)/pip install -q -e '.[dev,nnunet]'
	touch $@

# A C compiler for gateway/_pdata.c. Without one the install still succeeds and the gateway
# reads C-STORE data sets in Python (slower ingest); the test suite requires the C phase.
cc:
	@if ! command -v cc >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev; \
	  else \
	    echo "no C compiler: gateway/_pdata.c will not be built (install gcc for faster ingest)"; \
	  fi; \
	fi

# dcmtk (storescu/storescp), dicom3tools (dciodvfy), Orthanc (research PACS in e2e tests),
# chromium (the dashboard test drives it with Playwright; no browser download),
# redis-server (the gateway tests start a private broker on a free port).
system-deps:
	@if ! command -v storescu >/dev/null || ! command -v dciodvfy >/dev/null \
	    || ! command -v redis-server >/dev/null \
	    || ! test -x /usr/bin/chromium \
	    || ! { command -v Orthanc >/dev/null || test -x /usr/sbin/Orthanc; }; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	  else \
	    echo "make test needs the Debian packages: $(APT_PACKAGES) (run as root to install them)"; exit 1; \
	  fi; \
	fi

demo: $(STAMP)
	rm -rf demo
	$(BIN)/defacegate phantom demo/phantom --seed 1
	$(BIN)/defacegate deface demo/phantom/dicom demo/defaced
	@echo "defaced series written to $(CURDIR)/demo/defaced"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check gateway inference anonymizer tests bench
	$(BIN)/mypy gateway inference anonymizer

test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache gateway/_pdata*.so
