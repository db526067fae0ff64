# The two commands: `make run` and `make test`. Everything else is set up by them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
BENCH_STAMP := $(VENV)/.bench-installed-$(shell sha1sum pyproject.toml | cut -c1-12)
BENCH_OUT ?= benchmarks/results
# e.g. BENCH_ARGS='--retries never' to see bench-ci fail
BENCH_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint typecheck redis-server bench bench-ci bench-tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# The bench extra (matplotlib) also serves mypy on benchmarks/.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	rm -f $(VENV)/.bench-installed-*
	touch $@

run: $(STAMP)
	$(BIN)/resilgate demo

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server from Debian packages"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }

# nginx and wrk for the benchmarks, from Debian packages; a temporary policy-rc.d keeps the
# package from starting a system nginx (the suite runs its own, on loopback ports).
bench-tools:
	@if ! { command -v nginx || [ -x /usr/sbin/nginx ]; } >/dev/null 2>&1 || \
	    ! command -v wrk >/dev/null 2>&1; then \
	  echo "installing nginx-light and wrk from Debian packages"; \
	  made_policy=; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    made_policy=1; \
	    printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
	    $(SUDO) chmod 755 /usr/sbin/policy-rc.d; \
	  fi; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light wrk; \
	  status=$$?; \
	  if [ -n "$$made_policy" ]; then $(SUDO) rm -f /usr/sbin/policy-rc.d; fi; \
	  exit $$status; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check resilgate fallbacks tests benchmarks
	$(BIN)/ruff format --check resilgate fallbacks tests benchmarks

typecheck: $(BENCH_STAMP)
	$(BIN)/mypy resilgate fallbacks benchmarks tests/deploy

test: $(STAMP) redis-server lint typecheck
	$(BIN)/pytest

# Every scenario beside nginx and the bare aiohttp proxy; results, summary and plots in
# $(BENCH_OUT) (about 8 minutes; the journal figures need redis-server).
bench: $(BENCH_STAMP) bench-tools redis-server
	$(BIN)/python -m benchmarks run --out $(BENCH_OUT) $(BENCH_ARGS)

# Short steady state, primary SIGKILL and SIGSTOP, with the checks CI fails on (< 3 min).
bench-ci: $(BENCH_STAMP) bench-tools
	$(BIN)/python -m benchmarks run --ci --out $(BENCH_OUT)-ci $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
