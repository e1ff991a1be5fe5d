# Quickstart: `make demo` (built-in catalog: train, embed, evaluate) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: venv demo test test-slow clean

venv: $(VENV)/.installed

# The constraints file pins torch==2.13.0 (CPU wheel here) so no dependency can pull another build.
# The optional engines (Ray, Milvus Lite, ONNX Runtime) are installed too so that their tests run.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,ray,milvus,onnx]"
	touch $@

demo: venv
	$(BIN)/item-embed demo --out demo-output

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf demo-output .pytest_cache
