# `make run` starts the app offline with a demo; `make test` runs the whole test suite.
# Both create or update the same .venv and are quick the second time (stamp files).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
# llama.cpp's converter (the GGUF reference, and the export for families we do not stream), installed once.
CONVERTER := $(VENV)/share/llama.cpp-convert/convert_hf_to_gguf.py
# llama-cpp-python is built from source: portable flags, both cores; pip caches the wheel.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test bench deploy clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUN_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(TEST_STAMP): requirements.txt requirements-test.txt | $(PY)
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(RUN_STAMP) $@

$(CONVERTER): requirements.txt | $(RUN_STAMP)
	$(PY) -m quantize.upstream install
	touch $@

run: $(RUN_STAMP) $(CONVERTER)
	$(PY) app.py

test: $(TEST_STAMP) $(CONVERTER)
	$(PY) -m pytest

bench: $(TEST_STAMP) $(CONVERTER)
	$(PY) bench/merge.py

# Create or update a Space: make deploy SPACE=owner/name [CARD=space/README.md] (token: HF_TOKEN or `hf auth login`).
CARD ?= space/README.md
deploy: $(RUN_STAMP)
	@test -n "$(SPACE)" || { echo "usage: make deploy SPACE=owner/name [CARD=space/README.md]" >&2; exit 2; }
	$(PY) -m merger.app.deploy $(SPACE) --card $(CARD)

clean:
	rm -rf $(VENV) .pytest_cache outputs demo_models
