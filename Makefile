# The two commands of the README: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PYTHONPATH := $(CURDIR)

.PHONY: setup redis-server demo test bench

# The project itself is installed editable, without fetching anything: the `cbir` command; then
# numba compiles the PNG decoder and the resize, so that the first command does not wait for it.
setup: redis-server
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PYTHON) scripts/compile_ahead.py

# Debian's redis-server: the standalone and cluster deployments of the integration tests; openssl
# makes the certificate of their TLS twins.
redis-server:
	@if [ ! -x /usr/bin/redis-server ] || [ ! -x /usr/bin/redis-cli ] || [ ! -x /usr/bin/openssl ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server openssl >/dev/null; \
	fi

demo: setup
	bash scripts/demo.sh

test: setup
	$(PYTHON) -m pytest -q --durations=10

bench: setup
	$(PYTHON) scripts/bench_ingest.py
	$(PYTHON) scripts/bench_index.py
