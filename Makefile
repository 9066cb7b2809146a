# Set-up commands: `make run` (embedded default, no servers) and `make test` (whole suite, real servers).
SHELL := /bin/bash
PYTHON_BIN ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-unit chaos stack-up stack-down stack-status bench clean

# The compiled decoder (native/, Rust): built with cargo (rustup's ~/.cargo/bin is searched too)
# into .cache/native-target, so a rebuild after a change compiles only what changed.
NATIVE_STAMP := $(VENV)/.native
NATIVE_SRC := native/Cargo.toml native/pyproject.toml $(wildcard native/src/*.rs)
CARGO_PATH := $(HOME)/.cargo/bin:$(PATH)

install: $(STAMP) $(NATIVE_STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON_BIN) >/dev/null || { echo "need $(PYTHON_BIN) on PATH" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --disable-pip-version-check uv
	@$(VENV)/bin/uv pip install -q --python $(PY) -e '.[test,bench]'
	@touch $(STAMP)

$(NATIVE_STAMP): $(STAMP) $(NATIVE_SRC)
	@PATH="$(CARGO_PATH)" command -v cargo >/dev/null || { echo "need cargo (https://rustup.rs) to build native/" >&2; exit 1; }
	@$(VENV)/bin/uv pip install -q --python $(PY) 'maturin>=1.7,<2'
	@rm -rf .cache/native-wheels
	@cd native && PATH="$(CARGO_PATH)" CARGO_TARGET_DIR=../.cache/native-target \
		../$(VENV)/bin/maturin build --release --quiet --interpreter ../$(PY) --out ../.cache/native-wheels
	@$(VENV)/bin/uv pip install -q --python $(PY) --reinstall .cache/native-wheels/*.whl
	@touch $(NATIVE_STAMP)

run: install
	$(PY) -m bytewax.run dataflows.main

# Starts the servers, runs every test, stops the servers; the exit code is pytest's.
test: install
	@bash stack/stack.sh up
	@status=0; $(PY) -m pytest $(PYTEST_ARGS) || status=$$?; bash stack/stack.sh down; exit $$status

test-unit: install
	$(PY) -m pytest -m "not servers" $(PYTEST_ARGS)

# Long crash test: 50 SIGKILLs at random moments, output compared with a clean run.
chaos: install
	@bash stack/stack.sh up
	$(PY) -m tests.chaos --kills 50

stack-up:
	@bash stack/stack.sh up

stack-down:
	@bash stack/stack.sh down

stack-status:
	@bash stack/stack.sh status

# Throughput/latency benchmark (docs/benchmarks.md); its last line is the BENCH summary. Starts the
# servers if none was running and then stops them again; a running stack is left as it is. Installs
# jemalloc for the jobs where it can (without it they run on glibc malloc, and the run says so).
bench: install
	@SVC=bench bash -c 'source stack/lib.sh; is_root && apt_ensure libjemalloc2 || true' >&2
	@was_up=$$(bash stack/stack.sh status | grep -c ' up ' || true); \
	bash stack/stack.sh up >&2 || exit $$?; \
	status=0; $(PY) -m bench run $(BENCH_ARGS) || status=$$?; \
	if [ "$$was_up" = 0 ]; then bash stack/stack.sh down >&2; fi; exit $$status

clean:
	rm -rf out .pytest_cache
