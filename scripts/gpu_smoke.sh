#!/usr/bin/env bash
# GPU smoke test: proves the GPU path end to end on ONE GPU in under ~5 minutes (H100 / H200), and prints
# tokens/s, MFU and peak memory of each training run as a table.
#
#   bash scripts/gpu_smoke.sh                 # one GPU: FLT 350M (eager, then torch.compile) + an LT2 hybrid
#   bash scripts/gpu_smoke.sh --tiny          # the same steps with tiny shapes on CPU (CI; ~1 minute)
#   options: --out DIR (default runs/gpu_smoke, or runs/gpu_smoke_tiny with --tiny)
#            --keep-checkpoints (default: the FLT runs' multi-GB checkpoints are deleted once measured)
#            --inductor (with --tiny: compile with Inductor instead of the aot_eager backend, see below)
#   environment: PEAK_FLOPS=<dense bf16 FLOP/s of one GPU> for the MFU column (default: guessed from
#                nvidia-smi's GPU name: H100 / H200 989e12, A100 312e12; unknown GPUs: no MFU)
#                FLT_STEPS (20), HYBRID_STEPS (10)
#
# Steps: 1 demo corpus (the Python standard library's sources; no download) -> 2 byte-level Megatron
# dataset (tools/preprocess_data.py) -> 3 FLT 350M (yaml_configs/flt_350m_8gpu.yaml on one GPU: bf16
# autocast, per-loop activation checkpointing, ZeRO 0, micro-batch 8 x 2048, R = 4) without and 4 with
# train.compile, then once more with train.optimizer=muon -> 5 LT2 GDN + DSA hybrid (yaml_configs/smoke_lt2_hybrid.yaml) -> 6 export to Hugging Face
# (tools/export_hf.py, checked against megaloop's logits) -> 7 reload the exported folder with transformers
# and generate a few tokens (tools/generate.py) -> 8 the table. Throughput and MFU are the median of the
# console's logged intervals after the first (the first holds start-up and compilation).
#
# Before running on a GPU (this script installs nothing):
#   1. the torch build that matches your CUDA (see pytorch.org), then, from the repository root,
#   2. pip install -e ".[test,hf,eval]"          (DeepSpeed, transformers, sentencepiece, pytest, ...)
#      or: MEGALOOP_TORCH=keep bash scripts/setup_env.sh   (creates/uses ./.venv and keeps its torch)
#   3. optional: pip install flash-linear-attention (with a Triton new enough for your GPU) for the GDN
#      kernel; without it (or if its probe fails) the LT2 run uses megaloop's torch GDN, with one warning.
# Uses ./.venv/bin/python when present, else `python`. Works from any directory; writes under --out only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

TINY=0; KEEP=0; INDUCTOR=0; OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --keep-checkpoints) KEEP=1 ;;
    --inductor) INDUCTOR=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_smoke: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"; else PY=python; fi
if [ -z "$OUT" ]; then OUT=runs/gpu_smoke; [ "$TINY" = 1 ] && OUT=runs/gpu_smoke_tiny; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS="$OUT/logs"
mkdir -p "$LOGS"
: > "$OUT/runs.tsv"   # name, output dir, console log, wall seconds (read by the table step)
T_START=$(date +%s)

fail() { echo "gpu_smoke: FAILED: $*" >&2; exit 1; }

# run_step NAME LOG cmd...: run one step with its output on the console and in LOG; on failure say which
# step failed, show the end of its log and stop.
run_step() {
  local name=$1 log=$2; shift 2
  echo "== $name"
  local rc
  set +e
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" != 0 ]; then
    echo "---- last lines of $log ----" >&2
    tail -n 30 "$log" >&2 || true
    fail "step '$name' exited with status $rc (full log: $log)"
  fi
}

if [ "$TINY" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # Inductor's cold C++ compile of even a tiny layer costs ~25 CPU-seconds; CI exercises Dynamo's tracing
  # and AOTAutograd of megaloop's layers (graph breaks, guards, recompiles) with the aot_eager backend.
  if [ "$INDUCTOR" = 0 ]; then export TORCH_COMPILE_OVERRIDE_BACKENDS=">=0:aot_eager"; fi
  CORPUS_BYTES=300000
  PEAK=${PEAK_FLOPS:-1e11}   # a nominal CPU figure: the MFU column only shows the share is computed
  FLT_STEPS=${FLT_STEPS:-10}; HYBRID_STEPS=${HYBRID_STEPS:-6}; LOG_EVERY=2
  FLT_SHAPE=(model.d_model=64 model.n_heads=4 model.n_kv_heads=2 model.n_loop=2 model.vocab_size=258
             model.pad_vocab_multiple=64 model.max_seq_len=64 data.seq_len=64 train.micro_batch_size=4)
  HYBRID_SHAPE=(model.d_model=64 model.n_heads=4 model.n_kv_heads=2 model.max_seq_len=64 data.seq_len=64
                model.window=16 model.dsa_topk=16 train.micro_batch_size=4)
  GEN_TOKENS=8
else
  "$PY" - <<'PY' || fail "no GPU accelerator for DeepSpeed (install the torch build for your CUDA, then pip install -e '.[test,hf,eval]'; see the header of scripts/gpu_smoke.sh)"
import sys
try:
    import torch, deepspeed  # noqa: F401
    from deepspeed.accelerator import get_accelerator
except ImportError as exc:
    sys.exit(f"gpu_smoke: cannot import {exc.name}")
acc = get_accelerator()
if acc.device_name() == "cpu":
    sys.exit("gpu_smoke: DeepSpeed's accelerator is the CPU (DS_ACCELERATOR=cpu set, or no GPU visible); "
             "use --tiny for the CPU version")
print(f"gpu_smoke: torch {torch.__version__}, deepspeed {deepspeed.__version__}, accelerator {acc.device_name()}, "
      f"{acc.device_count()} device(s)")
PY
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
  case "$GPU_NAME" in
    *H100*|*H200*|*H800*) GUESS=989e12 ;;   # dense bf16 (SXM); an H100 PCIe is 756e12: set PEAK_FLOPS
    *A100*|*A800*) GUESS=312e12 ;;
    *) GUESS="" ;;
  esac
  PEAK=${PEAK_FLOPS:-$GUESS}
  [ -n "$PEAK" ] || echo "gpu_smoke: unknown GPU '$GPU_NAME': set PEAK_FLOPS=<dense bf16 FLOP/s> for the MFU column"
  echo "gpu_smoke: GPU '${GPU_NAME:-?}', peak ${PEAK:-unknown} FLOP/s for MFU"
  CORPUS_BYTES=4000000
  FLT_STEPS=${FLT_STEPS:-20}; HYBRID_STEPS=${HYBRID_STEPS:-10}; LOG_EVERY=5
  FLT_SHAPE=()
  HYBRID_SHAPE=()
  GEN_TOKENS=16
fi
PEAK_ARG=("train.peak_flops=${PEAK:-null}")   # null: no MFU (not the YAML's H100 figure on another GPU)

# ------------------------------------------------------------------------------------------------
DATA="$OUT/data"
mkdir -p "$DATA"
run_step "1/8 demo corpus ($CORPUS_BYTES bytes of the standard library's sources)" "$LOGS/corpus.log" \
  "$PY" tools/make_demo_corpus.py --output "$DATA/corpus.jsonl" --max-bytes "$CORPUS_BYTES"
run_step "2/8 preprocess (byte tokenizer) -> $DATA/corpus_text_document" "$LOGS/preprocess.log" \
  "$PY" tools/preprocess_data.py --input "$DATA/corpus.jsonl" --json-keys text --tokenizer-type byte \
    --append-eod --output-prefix "$DATA/corpus" --workers 1 --quiet
[ -s "$DATA/corpus_text_document.idx" ] || fail "preprocessing wrote no $DATA/corpus_text_document.idx"

COMMON=("data.data_path=[$DATA/corpus_text_document]" data.split=1000,0,0 data.tokenizer_type=byte
        data.tokenizer_model=null "data.cache_dir=$DATA/index-cache" train.eval_interval=0 train.save_interval=0
        train.keep_checkpoints=0 train.tensorboard=false "train.log_interval=$LOG_EVERY" ${PEAK_ARG[@]+"${PEAK_ARG[@]}"})

# train NAME CONFIG STEPS overrides...: one training run (one rank, no launcher), output under $OUT/NAME.
train() {
  local name=$1 config=$2 steps=$3; shift 3
  local dir="$OUT/$name" log="$LOGS/$name.log"
  rm -rf "$dir"
  local t0; t0=$(date +%s)
  run_step "$name: $config, $steps steps" "$log" \
    "$PY" pretrain_looped.py --config "$config" --no-auto-resume "${COMMON[@]}" "train.steps=$steps" \
      "train.output_dir=$dir" train.warmup_steps=2 "$@"
  printf '%s\t%s\t%s\t%s\n' "$name" "$dir" "$log" "$(( $(date +%s) - t0 ))" >> "$OUT/runs.tsv"
}

FLT=(yaml_configs/flt_350m_8gpu.yaml "$FLT_STEPS" ${FLT_SHAPE[@]+"${FLT_SHAPE[@]}"} train.precision=bf16 train.bf16_impl=autocast
     train.activation_checkpointing=loop parallel.zero_stage=0 train.grad_accum_steps=1)
echo "== 3/8 and 4/8: FLT 350M$([ "$TINY" = 1 ] && echo ' (tiny shapes)'), bf16 autocast, loop checkpointing, ZeRO 0"
train flt350m_eager "${FLT[@]}" train.compile=false
[ "$KEEP" = 1 ] || rm -rf "$OUT/flt350m_eager/checkpoints"
train flt350m_compile "${FLT[@]}" train.compile=true
[ "$KEEP" = 1 ] || rm -rf "$OUT/flt350m_compile/checkpoints"
# the FLT reference's optimizer (train.optimizer=muon: torch.optim.Muon for the matrices), eager
train flt350m_muon "${FLT[@]}" train.compile=false train.optimizer=muon
[ "$KEEP" = 1 ] || rm -rf "$OUT/flt350m_muon/checkpoints"

echo "== 5/8: LT2 GDN + DSA hybrid"
train lt2_hybrid yaml_configs/smoke_lt2_hybrid.yaml "$HYBRID_STEPS" ${HYBRID_SHAPE[@]+"${HYBRID_SHAPE[@]}"}
grep -h "GDN\|gdn" "$LOGS/lt2_hybrid.log" | head -n 3 || true

HF="$OUT/lt2_hybrid/hf"
run_step "6/8 export to Hugging Face -> $HF" "$LOGS/export.log" \
  "$PY" tools/export_hf.py --checkpoint "$OUT/lt2_hybrid" --output "$HF" --overwrite
[ -s "$HF/config.json" ] || fail "export wrote no $HF/config.json"
run_step "7/8 reload the exported folder (transformers, remote code) and generate $GEN_TOKENS tokens" \
  "$LOGS/generate.log" \
  "$PY" tools/generate.py --model "$HF" --prompt "def " --max-new-tokens "$GEN_TOKENS" --temperature 0

# ------------------------------------------------------------------------------------------------
echo "== 8/8 results"
"$PY" - "$OUT/runs.tsv" "$TINY" "$(( $(date +%s) - T_START ))" <<'PY'
import json, math, os, re, statistics, sys

runs_tsv, tiny, total_s = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
LINE = re.compile(r"step (\d+)/(\d+) \| loss (\S+) .*?\| tok/s ([\d,.]+) \| FLOP/s (\S+)(?: \(([\d.]+)% of peak\))?"
                  r" \| mem max ([\d.]+)(B|KiB|MiB|GiB)")


def parse(name, out_dir, log):
    rows = []
    with open(log, errors="replace") as f:
        for line in f:
            m = LINE.search(line)
            if m:
                rows.append({"step": int(m[1]), "loss": float(m[3]), "tok_s": float(m[4].replace(",", "")),
                             "flop_s": float(m[5]), "mfu": float(m[6]) if m[6] else None,
                             "mem": float(m[7]) * UNITS[m[8]]})
    # metrics.jsonl: per-step rows; its logged-step fields win over the console when the trainer writes them
    path = os.path.join(out_dir, "metrics.jsonl")
    by_step = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if "step" in r:
                    by_step.setdefault(r["step"], {}).update(r)
    for row in rows:
        j = by_step.get(row["step"], {})
        for key, jkey, scale in (("tok_s", "tokens_per_s", 1), ("flop_s", "flops_per_s", 1),
                                 ("mfu", "peak_flops_share", 100), ("mem", "memory_max_bytes", 1)):
            if isinstance(j.get(jkey), (int, float)):
                row[key] = j[jkey] * scale
    if not rows:
        sys.exit(f"gpu_smoke: FAILED: no step lines with tok/s in {log}")
    steady = rows[1:] or rows  # the first interval holds start-up (and compilation)
    med = lambda k: statistics.median(r[k] for r in steady) if all(r[k] is not None for r in steady) else None
    final_loss = rows[-1]["loss"]
    last = by_step.get(max(by_step), {}) if by_step else {}
    if isinstance(last.get("loss"), (int, float)):
        final_loss = last["loss"]
    return {"name": name, "steps": rows[-1]["step"], "tok_s": med("tok_s"), "flop_s": med("flop_s"),
            "mfu": med("mfu"), "mem": max(r["mem"] for r in rows), "loss": final_loss}


results = []
with open(runs_tsv) as f:
    for line in f:
        name, out_dir, log, wall = line.rstrip("\n").split("\t")
        r = parse(name, out_dir, log)
        r["wall"] = int(wall)
        results.append(r)

mem_kind = "RSS" if tiny else "peak mem"
hdr = f"| {'run':16s} | {'steps':>5s} | {'tokens/s':>10s} | {'TFLOP/s':>8s} | {'MFU %':>6s} | {mem_kind + ' GiB':>14s} | {'loss':>7s} | {'wall s':>6s} |"
print("\ngpu_smoke results" + (" (--tiny: CPU, tiny shapes; MFU against a nominal 1e11 FLOP/s)" if tiny else ""))
print(hdr)
print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
bad = []
for r in results:
    mfu = f"{r['mfu']:6.2f}" if r["mfu"] is not None else f"{'-':>6s}"
    print(f"| {r['name']:16s} | {r['steps']:5d} | {r['tok_s']:10,.0f} | {r['flop_s'] / 1e12:8.3f} | {mfu} | "
          f"{r['mem'] / 2**30:14.2f} | {r['loss']:7.4f} | {r['wall']:6d} |")
    if not (r["tok_s"] > 0 and math.isfinite(r["loss"]) and r["mem"] > 0):
        bad.append(r["name"])
e, c = {r["name"]: r for r in results}.get("flt350m_eager"), {r["name"]: r for r in results}.get("flt350m_compile")
if e and c:
    print(f"torch.compile speed-up (FLT): {c['tok_s'] / e['tok_s']:.3f}x tokens/s, peak memory "
          f"{c['mem'] / e['mem']:.3f}x")
print(f"gpu_smoke total: {total_s} s")
if bad:
    sys.exit(f"gpu_smoke: FAILED: non-positive throughput / memory or non-finite loss in {', '.join(bad)}")
print("gpu_smoke: OK")
PY
