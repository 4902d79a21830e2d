# Every target builds .venv from the project's own files, so a fresh machine
# with only Python needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench fuzz venv clean

venv: $(STAMP)

# The native kernel (native/) is built into keyturn/ where cargo is present,
# and skipped with one line where it is not; a change to its sources rebuilds it.
NATIVE_SRC := $(wildcard native/Cargo.toml native/Cargo.lock native/src/*.rs)

$(STAMP): pyproject.toml $(NATIVE_SRC)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	sh native/build-dev.sh $(BIN)/python
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/keyturn demo

test: $(STAMP)
	$(BIN)/python -m pytest -n auto -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

# A coverage-guided fuzz run of the native kernel's open path (native/fuzz, libFuzzer). Needs a nightly
# toolchain and cargo-fuzz (`rustup toolchain install nightly`, `cargo install cargo-fuzz`); not part of
# `make test`. FUZZ_SECONDS=N sets its length.
FUZZ_SECONDS ?= 120
fuzz:
	cd native/fuzz && cargo +nightly fuzz run open_cells -- -max_total_time=$(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo-out bench-out native/target native/fuzz/target keyturn/_native*.so
