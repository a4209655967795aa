#!/usr/bin/env bash
# The main job end to end on CPU, from a fresh machine:
#   environment -> demo corpus (the Python standard library's sources in a seeded shuffled order, no
#   download) -> sentencepiece tokenizer -> Megatron-format token dataset -> pretraining with the
#   deepspeed launcher on 2 CPU ranks (a 2-stage pipeline, the looped block held whole by one stage) ->
#   export to Hugging Face -> validation perplexity vs test-time loops -> text sampled from the exported
#   folder with transformers.
# Everything lands under data/ and runs/demo_cpu/. Re-running reuses the data and resumes the run from its
# latest checkpoint (a finished run goes straight to export); delete runs/demo_cpu to train afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH"
PY=.venv/bin/python
mkdir -p data

echo "== 1/7 demo corpus"
[ -s data/demo.jsonl ] || $PY tools/make_demo_corpus.py --output data/demo.jsonl --max-bytes 8000000

echo "== 2/7 tokenizer (sentencepiece BPE, 1024 pieces)"
[ -s data/demo_spm.model ] || $PY tools/train_tokenizer.py --input data/demo.jsonl --model-prefix data/demo_spm \
    --vocab-size 1024 --model-type bpe

echo "== 3/7 preprocessing to data/demo_text_document.{bin,idx}"
[ -s data/demo_text_document.idx ] || $PY tools/preprocess_data.py --input data/demo.jsonl \
    --tokenizer-type sentencepiece --tokenizer-model data/demo_spm.model --append-eod \
    --output-prefix data/demo --workers 2

echo "== 4/7 pretraining: deepspeed, 2 CPU ranks, pipeline parallel 2"
deepspeed --num_gpus 2 pretrain_looped.py --config yaml_configs/demo_cpu.yaml "$@"

echo "== 5/7 export to Hugging Face: runs/demo_cpu/hf"
$PY tools/export_hf.py --checkpoint runs/demo_cpu --output runs/demo_cpu/hf --overwrite

echo "== 6/7 validation perplexity vs test-time loops: runs/demo_cpu/eval/eval_loops.{csv,png}"
# The run's own validation documents (data.split 98,2,0), all of them (about 750 windows of 64 tokens).
$PY tools/eval_loops.py --model runs/demo_cpu --data data/demo_text_document --out-dir runs/demo_cpu/eval \
    --split 98,2,0 --max-windows 1024 --exits kl:1e-3

echo "== 7/7 sample from the exported folder with transformers (no megaloop import)"
$PY - <<'PY'
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "runs/demo_cpu/hf"
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
ids = tok("def ", return_tensors="pt").input_ids
for loops in (1, model.config.num_loops, 2 * model.config.num_loops):
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_p=0.95, num_loops=loops)
    print(f"--- {loops} loops ---")
    print(tok.decode(out[0].tolist()))
PY
