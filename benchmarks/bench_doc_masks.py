"""Step time with packed-document masks on (data.reset_attention_mask + reset_position_ids +
eod_mask_loss) against off, on one process at a config's shape (the demo's by default).

One step = forward + backward + AdamW step on one micro-batch of `train.micro_batch_size` x `data.seq_len`
tokens, at R = model.loops, with the config's activation checkpointing; the tokens are documents of
random lengths (geometric, mean --mean-doc tokens), each ended by the eod. The masks-on step builds the
document structure from the tokens every step (ids, positions, RoPE, the SDPA mask), as training does.
Timing: process CPU time on CPU (steadier on a shared machine), wall time with synchronize() on
accelerators; the two settings alternate, best of --repeats each.

    python benchmarks/bench_doc_masks.py [--config yaml_configs/demo_cpu.yaml] [--repeats 20] [k=v ...]

Measured on the 2 shared CPU cores of the dev machine (OMP_NUM_THREADS=1, torch 2.13 CPU, load average ~20 from
other jobs, so single runs vary by ~10%), documents of mean 16 tokens (~5.5 per 64-token row):
    python benchmarks/bench_doc_masks.py                                  demo_cpu.yaml (FLT, 2 layers x R=3,
        8 x 64, loop checkpointing): off 103.2 / on 93.9 ms (0.91x); a second run off 81.3 / on 84.5 ms (1.04x)
    ... --config yaml_configs/tiny/lt2_hybrid.yaml --repeats 10           off 431.4 / on 433.1 ms (1.00x)
    ... --config yaml_configs/tiny/lt2_gdn_dsa.yaml --repeats 10          off 211.5 / on 217.1 ms (1.03x)
    ... --config yaml_configs/tiny/swa.yaml --repeats 10                  off  67.8 / on  71.6 ms (1.06x)
    ... --repeats 5 --mean-doc 128 data.seq_len=1024 model.max_seq_len=1024 train.micro_batch_size=2
                                                                          off 557.8 / on 742.4 ms (1.33x)
The last line is the known cost at long sequences: SDPA with a boolean mask computes all T x T scores where
is_causal skips the upper triangle (on CUDA the mask also rules out the flash kernel; flex_attention's block
mask would skip the off-document blocks: not done yet, no GPU measurement).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]


def packed_tokens(B, T, vocab, eod, mean_doc, gen):
    import torch
    tokens = torch.randint(0, min(vocab, eod), (B, T), generator=gen)
    ends = torch.rand(B, T, generator=gen) < 1.0 / mean_doc  # geometric document lengths
    tokens[ends] = eod
    return tokens


def main(argv=None):
    import torch
    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.model.documents import DocumentPacking

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "yaml_configs/demo_cpu.yaml"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--mean-doc", type=float, default=16.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    model.block.activation_checkpointing = cfg.train.activation_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, T, R = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.loops
    eod = cfg.model.vocab_size - 1  # any id: the masks only look for it
    gen = torch.Generator().manual_seed(0)
    x = packed_tokens(B, T + 1, cfg.model.vocab_size, eod, a.mean_doc, gen).to(dev)
    tokens, labels = x[:, :-1], x[:, 1:]
    masked_labels = labels.masked_fill(tokens == eod, -1)
    packing = DocumentPacking(eod, reset_attention_mask=True, reset_position_ids=True)

    def step(on: bool):
        model.packing = packing if on else None
        out = model(tokens, labels=masked_labels if on else labels, loops=R)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def timed(on: bool) -> float:
        if cuda:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        else:
            t0 = time.process_time()
        step(on)
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        return time.process_time() - t0

    for on in (False, True):  # warm-up
        step(on)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(a.repeats):
        for on in (False, True):
            best[on] = min(best[on], timed(on))
    docs = float((tokens == eod).sum()) / B + 1
    print(f"{Path(a.config).name}: {cfg.model.arch}, mixer {cfg.model.mixer}, {cfg.model.n_loop} looped layers x R={R}, "
          f"micro-batch {B} x {T} tokens (~{docs:.1f} documents per row), "
          f"activation checkpointing {cfg.train.activation_checkpointing}, {dev.type}")
    print(f"  masks off: {best[False] * 1e3:8.2f} ms per step")
    print(f"  masks on:  {best[True] * 1e3:8.2f} ms per step  ({best[True] / best[False]:.3f}x)")
    return best


if __name__ == "__main__":
    main()
