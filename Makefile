# `make test` is the one test command: installs what it needs, lints, runs the host tier and the
# kernel tier (pytest inside a user-mode-linux guest with real device-mapper).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest -p no:cacheprovider --color=no
export PY_COLORS := 0

.PHONY: test install lint test-host test-kernel test-kernel-fast test-kernel-slow fixtures demo bench clean fuzz

REPORTS := build/test-reports

# Both tiers always run; the summary names what ran in each and fails if either failed. The slow kernel
# tests (end to end on real images) boot their own guest in the background while the host tier, the other
# kernel tests and the fuzz run go on: a guest uses one core, and the machine has two.
test: install lint fixtures
	@mkdir -p $(REPORTS); rm -f $(REPORTS)/*.xml $(REPORTS)/*.log; rc=0; \
	$(MAKE) --no-print-directory test-kernel-slow > $(REPORTS)/kernel-slow.log 2>&1 & slow=$$!; \
	$(MAKE) --no-print-directory test-host || rc=1; \
	$(MAKE) --no-print-directory test-kernel-fast || rc=1; \
	$(MAKE) --no-print-directory fuzz || rc=1; \
	wait $$slow || rc=1; \
	echo "---- slow kernel tests (guest log: $(REPORTS)/kernel-slow.log) ----"; cat $(REPORTS)/kernel-slow.log; \
	$(PY) scripts/test-summary.py host=$(REPORTS)/host.xml \
	  kernel=$(REPORTS)/kernel.xml,$(REPORTS)/kernel-slow.xml || rc=1; \
	exit $$rc

install:
	@scripts/bootstrap.sh

lint: install
	$(VENV)/bin/ruff check frontend helper tests bench
	$(VENV)/bin/mypy

fixtures: install
	$(PY) -m tests.images.build

test-host: install
	$(PYTEST) -m "not kernel" --junitxml=$(REPORTS)/host.xml tests

test-kernel: test-kernel-fast test-kernel-slow

test-kernel-fast: install fixtures
	tests/vm/run $(PYTEST) -m "kernel and not slow" --junitxml=$(REPORTS)/kernel.xml tests

test-kernel-slow: install fixtures
	tests/vm/run $(PYTEST) -m "kernel and slow" --junitxml=$(REPORTS)/kernel-slow.xml tests

# A short atheris run over the layer extractor (seeds: the hostile corpus).
fuzz: install
	@mkdir -p build/fuzz
	$(PY) tests/fuzz/fuzz_extract.py -max_total_time=40 -print_final_stats=1 -artifact_prefix=build/fuzz/

demo: install
	scripts/demo.sh

bench: install
	$(VENV)/bin/img bench extract

clean:
	rm -rf build $(VENV) helper/img_helper/_native*.so
