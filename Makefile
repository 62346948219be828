# Everything runs from a local virtualenv that these targets create.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/clavitor-repl: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

demo: $(BIN)/clavitor-repl
	$(BIN)/clavitor-repl demo

test: $(BIN)/clavitor-repl
	$(BIN)/trial tests

bench: $(BIN)/clavitor-repl
	$(BIN)/python bench/replication.py

clean:
	rm -rf $(VENV) _trial_temp *.egg-info
