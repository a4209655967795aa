"""Import a Hugging Face model folder as a megaloop run folder, to start training from it.

    python tools/import_hf.py --model HF_FOLDER --output RUN_DIR [section.key=value ...]
    python tools/import_hf.py --model llama-folder --output runs/llama-looped --retrofit 2,4,2 model.loops=4

Formats (megaloop/hf_import/: one module each, with the key and config mapping and what is refused):
  megaloop  a megaloop export (tools/export_hf.py; config.json model_type "megaloop")
  ouro      OuroForCausalLM (model_type "ouro"): every layer shared and looped total_ut_steps times
  llama     LlamaForCausalLM: a plain model (all layers in the block, R = 1), or with --retrofit P,B,C a
            looped one: the first P layers become the prelude, the last C the coda, B layers from
            --block-from (default P) the looped block (at R = 1, with P + B + C = all layers, the
            original model's logits)

RUN_DIR gets config.yaml (the resolved run config: the source's model section plus your overrides),
model.safetensors (the weights, megaloop.checkpoint.plain's format) and import.json (what was mapped, what kept
megaloop's init). pretrain_looped.py loads it through **init.from** (weights only, into any TP x PP x
ZeRO layout, fresh optimizer, step 0), not through train.load / auto-resume (there is no optimizer
state to continue):

    python pretrain_looped.py --config RUN_DIR/config.yaml init.from=RUN_DIR train.output_dir=runs/ft \
        data.data_path=[data/my_text_document] parallel.tensor_parallel=2

Refused in one line (exit code 2), nothing written: an unsupported model_type, a tensor the mapping has
no place for (unknown key), a missing tensor, a wrong shape, a config field megaloop cannot compute
(rope scaling, biases, sliding windows, a non-SiLU MLP), an --output that exists and is not empty.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _retrofit(text):
    try:
        p, b, c = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three layer counts PRELUDE,BLOCK,CODA, e.g. 2,4,2")
    return p, b, c


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json + model.safetensors)")
    p.add_argument("--output", required=True, help="run folder to write (must not exist, or be empty)")
    p.add_argument("--retrofit", type=_retrofit, default=None, metavar="P,B,C",
                   help="Llama only: prelude, looped block and coda layer counts")
    p.add_argument("--block-from", type=int, default=None, metavar="K",
                   help="with --retrofit: the looped block takes layers K..K+B-1 (default K = P)")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to the run config")
    args = p.parse_args(argv)

    from megaloop.hf_import import import_hf

    out = import_hf(args.model, args.output, args.overrides, args.retrofit, args.block_from)
    print(f"imported {args.model} -> {out} (config.yaml, model.safetensors, import.json); start a run with:\n"
          f"  python pretrain_looped.py --config {out}/config.yaml init.from={out} train.output_dir=RUN "
          f"data.data_path=[...]")
    if (out / "tokenizer.json").is_file():  # the folder's Hugging Face tokenizer came along
        print(f"tokenize its data with:\n  python tools/preprocess_data.py --tokenizer-type hf --tokenizer-model {out} "
              f"--input ... --output-prefix ... --append-eod")
    return 0


if __name__ == "__main__":
    from megaloop.errors import run_cli

    sys.exit(run_cli(_main))
