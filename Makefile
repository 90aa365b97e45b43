# The two commands of the README: `make demo` and `make test`. Both set up what they need first:
# a project environment in .venv (the system Python may refuse pip: PEP 668), Debian's redis-server.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PYTHONPATH := $(CURDIR)

.PHONY: setup debian-packages demo test bench fault-table serve screenshots

# A fresh Debian or Ubuntu Python lacks venv's ensurepip until python3-venv is installed.
$(PY):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV) && $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
		$(PYTHON) -m venv $(VENV); }

# Installed again only when requirements.txt or pyproject.toml change; the project itself is
# installed editable (the `cbir` command in .venv/bin), without fetching anything.
$(VENV)/.installed: $(PY) requirements.txt pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

setup: debian-packages $(VENV)/.installed

# Debian's packages: redis-server for the standalone and cluster deployments of the integration
# tests, openssl for the certificate of their TLS twins, chromium for the web page's browser tests
# (Playwright drives it: its own browser download needs internet).
debian-packages:
	@if [ ! -x /usr/bin/redis-server ] || [ ! -x /usr/bin/redis-cli ] || [ ! -x /usr/bin/openssl ] || [ ! -x /usr/bin/chromium ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends redis-server openssl chromium fonts-liberation >/dev/null; \
	fi

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q --durations=10

# The HTTP API over the embedded Redis (or $CBIR_REDIS_URL), on http://127.0.0.1:8000 (docs at /docs).
serve: setup
	$(PY) -m cbir serve

bench: setup
	$(PY) scripts/bench_ingest.py
	$(PY) scripts/bench_index.py

# The whole suite, its fault tests' rows written into docs/RELIABILITY.md's table.
fault-table: setup
	CBIR_FAULT_TABLE_DOC=docs/RELIABILITY.md $(PY) -m pytest -q

# The web page's browser tests, their screenshots written into docs/screenshots (shown by the README).
screenshots: setup
	CBIR_SCREENSHOTS=docs/screenshots $(PY) -m pytest -q tests/test_page.py
