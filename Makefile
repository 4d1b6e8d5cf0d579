# The two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: demo test bench lint
demo: $(VENV)/.installed
	$(PY) -m blindseg demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/mypy blindseg dealer data_owner model_owner netsim server server0 server1

# Peers for the README's comparison, each in its own venv (not needed by the tests or the demo).
.PHONY: peers
peers:
	python3 -m venv .peers/crypten
	.peers/crypten/bin/pip install -q torch==2.13.0
	SKLEARN_ALLOW_DEPRECATED_SKLEARN_PACKAGE_INSTALL=True .peers/crypten/bin/pip install -q crypten==0.4.1
	python3 -m venv .peers/spu
	.peers/spu/bin/pip install -q spu==0.9.5 jax==0.4.34 jaxlib==0.4.34
