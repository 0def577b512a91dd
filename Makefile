# One command each on a fresh machine: `make test`, `make demo`.
# Both create .venv and install the package (editable, with test extras) when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out

.PHONY: install test test-all demo bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The default suite skips tests marked slow or gpu-only; `make test-all` runs the slow ones too.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info .pytest_cache
