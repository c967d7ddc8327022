#!/usr/bin/env bash
# One GPU run: environment, the kernel tests on the GPU, kernel TFLOP/s vs SDPA, end to end on a
# LLaMA-7B-shaped model. Writes into $1 (default benchmarks/results/gpu). Each stage has its own time
# limit so that one slow stage cannot cost the others; a stage that fails is reported and the next runs.
#
#     bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-benchmarks/results/gpu}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/headscore-torch-ext}
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| triton', triton.__version__, '| transformers', transformers.__version__); \
print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nvcc --version | tail -1 || true
} 2>&1 | tee "$OUTDIR/env.txt"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  echo "== $name (limit ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" = 0 ] || status=1
}

stage kernel-tests "${KERNEL_TESTS_S:-170}" $PY -m pytest tests/kernels -q -p no:cacheprovider -rfEs
stage attention-bench "${ATTN_BENCH_S:-120}" $PY benchmarks/bench_gated_attention.py --head-dims 128 \
  --seq-lens 1024,2048,4096,8192,16384 --model-dim 4096 --total-tokens 16384 --warmup 10 --rep 40 \
  --out "$OUTDIR/gated_attention.csv"
stage e2e "${E2E_S:-150}" $PY benchmarks/gpu_e2e.py --layers 8 --seq-len 2048 --examples 4 --batch-size 2 \
  --out "$OUTDIR/gpu_e2e.json"
exit $status
