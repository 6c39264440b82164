# Two commands do all set-up on a fresh machine:
#   make demo   - run a whole federation on this machine and print what happened
#   make test   - run the test-suite (what CI runs)
VENV ?= .venv
export VENV

.PHONY: setup demo test lint bench
setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/alignfed demo

test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/python benchmarks/run_all.py

# Emulated aarch64 boards (Debian arm64 root under qemu-user): not part of `make test`; see tests/aarch64/lane.sh.
.PHONY: test-aarch64
test-aarch64: setup
	bash tests/aarch64/lane.sh
