# Every target builds .venv from the project's own files, so a fresh machine
# with only Python needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

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

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo-out bench-out native/target keyturn/_native*.so
