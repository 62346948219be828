# Everything runs from a local virtualenv that these targets create.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test bench clean

# An ordinary (PEP 660) editable install: setup.cfg maps the package root to
# this directory, so setuptools adds it to sys.path with a .pth file and
# twistd finds twisted/plugins/clavitor_repl.py beside the real Twisted.
$(BIN)/clavitor-repl: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/clavitor-repl
	$(BIN)/clavitor-repl demo

test: $(BIN)/clavitor-repl
	$(BIN)/trial tests

bench: $(BIN)/clavitor-repl
	$(BIN)/python bench/replication.py
	$(BIN)/python bench/reactor_stall.py

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info twisted/plugins/dropin.cache
