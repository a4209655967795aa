#!/usr/bin/env bash
# Issue 24's GPU acceptance run, prepared on CPU so that device time goes to measuring: each part bounded in
# time, its output in OUT/<part>.log, one summary at the end; a part that fails or runs out of time does not
# stop the others (the summary says which).
#
#   bash scripts/gpu_acceptance.sh                          # every part, on one GPU (~13 minutes)
#   bash scripts/gpu_acceptance.sh --parts smoke,plan       # a subset (a device call is at most 10 minutes:
#   bash scripts/gpu_acceptance.sh --parts overhead,mixers  #  run the parts in two calls)
#   bash scripts/gpu_acceptance.sh --tiny                   # the same parts with tiny shapes on CPU (~5 min)
#   options: --out DIR (default runs/gpu_acceptance, runs/gpu_acceptance_tiny with --tiny)
#
# Parts (in this order):
#   smoke     scripts/gpu_smoke.sh as the README says: the README's path end to end (FLT 350M eager and
#             compiled, LT2 hybrid, export, generate) and its tokens/s / MFU / peak memory table   ~5 min
#   plan      tools/plan.py for yaml_configs/flt_350m_8gpu.yaml on one GPU as the smoke trains it (bf16,
#             ZeRO 0, micro-batch 8 x 2048, R = 4) with per-loop checkpointing and without: the planner's
#             peaks beside the smoke's measured one (meta device: the full shape also with --tiny)    seconds
#   overhead  benchmarks/bench_train_overhead.py --preset flt350m --precision bf16 --ac loop, R 1 and 4,
#             without and with --compile: the DeepSpeed step's tokens/s against the plain loop     ~4 min
#   mixers    benchmarks/bench_mixers_ops.py --device <accelerator> --dtype bfloat16 at T 2k / 8k / 32k:
#             GDN (the training dispatcher: fla if it passes its probe, else compiled torch), SWA, DSA
#             against SDPA                                                                          ~3 min
# Environment: PART_TIMEOUT_S (default 420) bounds each part; PEAK_FLOPS as for gpu_smoke.sh.
# Installs nothing (see gpu_smoke.sh's header for the environment it needs).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TINY=0; OUT=""; PARTS="smoke,plan,overhead,mixers"
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    --parts) PARTS="$2"; shift ;;
    --parts=*) PARTS="${1#--parts=}" ;;
    *) echo "gpu_acceptance.sh: unknown argument '$1' (--parts LIST, --out DIR, --tiny)" >&2; exit 2 ;;
  esac
  shift
done
for p in ${PARTS//,/ }; do
  case "$p" in smoke|plan|overhead|mixers) ;; *)
    echo "gpu_acceptance.sh: unknown part '$p' in --parts (smoke, plan, overhead, mixers)" >&2; exit 2 ;;
  esac
done
PY=python; [ -x .venv/bin/python ] && PY=.venv/bin/python
OUT=${OUT:-runs/gpu_acceptance$([ $TINY = 1 ] && echo _tiny)}
mkdir -p "$OUT"
PART_TIMEOUT_S=${PART_TIMEOUT_S:-420}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ $TINY = 1 ]; then
  export DS_ACCELERATOR=cpu
  DEVICE=cpu; DTYPE=float32; LENGTHS="256 512"; PRESET=tiny; PRECISION=fp32; SMOKE=(--tiny)
else
  DEVICE=$("$PY" -c "from deepspeed.accelerator import get_accelerator as g; print(g().device_name())")
  DTYPE=bfloat16; LENGTHS="2048 8192 32768"; PRESET=flt350m; PRECISION=bf16; SMOKE=()
fi

declare -A STATUS
run_part() {  # run_part NAME command...: bounded, logged, its exit status kept for the summary
  local name=$1; shift
  echo "== $name: $* (at most ${PART_TIMEOUT_S}s; log $OUT/$name.log)"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=30 "$PART_TIMEOUT_S" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  case $rc in 0) STATUS[$name]="ok" ;; 124|137) STATUS[$name]="TIMED OUT after ${PART_TIMEOUT_S}s" ;;
              *) STATUS[$name]="FAILED (exit $rc)" ;; esac
  STATUS[$name]="${STATUS[$name]}, $((SECONDS - t0))s"
  tail -n 25 "$OUT/$name.log"
}

for p in ${PARTS//,/ }; do
  case "$p" in
    smoke) run_part smoke bash scripts/gpu_smoke.sh ${SMOKE[@]+"${SMOKE[@]}"} --out "$OUT/smoke" ;;
    plan)
      for ac in loop none; do
        run_part "plan_ac_$ac" "$PY" tools/plan.py --config yaml_configs/flt_350m_8gpu.yaml --nodes 1 \
          --gpus-per-node 1 --gpu h100 train.precision=bf16 train.bf16_impl=autocast parallel.zero_stage=0 \
          train.grad_accum_steps=1 "train.activation_checkpointing=$ac"
      done ;;
    overhead)
      run_part overhead_eager "$PY" benchmarks/bench_train_overhead.py --preset $PRESET --precision $PRECISION \
        --ac loop --loops 1,4
      run_part overhead_compile "$PY" benchmarks/bench_train_overhead.py --preset $PRESET --precision $PRECISION \
        --ac loop --loops 1,4 --compile ;;
    mixers)
      run_part mixers "$PY" benchmarks/bench_mixers_ops.py --device "$DEVICE" --dtype $DTYPE --lengths $LENGTHS \
        --mixers softmax gdn swa dsa --reps 3 ;;
  esac
done

echo
echo "== summary ($OUT)"
"$PY" -c "import torch, deepspeed; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| DeepSpeed', deepspeed.__version__)" 2>/dev/null
"$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
"$PY" -c "import fla; print('fla', getattr(fla, '__version__', '?'))" 2>/dev/null || echo "fla: not installed"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for name in "${!STATUS[@]}"; do echo "$name: ${STATUS[$name]}"; done | sort
failed=0
for name in "${!STATUS[@]}"; do case "${STATUS[$name]}" in ok*) ;; *) failed=1 ;; esac; done
exit $failed
