# The two set-up commands of the README: `make run` and `make test`.
# Each creates .venv on first use (tools/bootstrap.sh) and reuses it afterwards.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedsim-installed
OUT ?= runs/default

.PHONY: run test bench clean

$(STAMP): pyproject.toml tools/bootstrap.sh
	bash tools/bootstrap.sh $(VENV)

run: $(STAMP)
	$(VENV)/bin/fedsim run --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/overhead.py
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
