"""Does looping cost more per token than a plain transformer of the same effective depth?

For each architecture (its tiny config, a --preset or a --config YAML), times a training step at each R
and compares it with a plain (non-looped) transformer built from the same layer code with n_loop * R
layers, measured in the same run, interleaved so machine noise hits both alike. Read the R = 1 rows as
the noise floor: there the looped and the plain model do identical work.

A step is forward + backward (+ with --optim, gradient clipping and megaloop's AdamW from
`build_optimizer`: fused on CUDA), under the production settings you choose: --precision fp32|bf16
(torch.autocast), --compile (torch.compile per transformer layer, megaloop.model.compile), --ac
loop|layer|none (activation checkpointing of the looped model; the plain reference then checkpoints per
layer for loop|layer: the same recompute work, without holding its whole stack during one recompute).

    python benchmarks/bench_loop_overhead.py [--archs lt,flt] [--loops 1,4,12] [--repeats 7]    # tiny, CPU
    python benchmarks/bench_loop_overhead.py --preset flt350m --precision bf16 --ac loop --optim [--compile]
    python benchmarks/bench_loop_overhead.py --config yaml_configs/ouro_1p4b_16gpu.yaml --loops 1,4

Prints one row per (arch, R): tokens/s of the looped model, of the plain one, their ratio (goal >= 0.95)
and memory. Timing: on CPU process CPU time (less disturbed than wall time by other work on a shared
machine), on accelerators wall time with one synchronize() per block; best of --repeats interleaved blocks
of steps, each block at least --min-seconds. Memory: the bytes autograd saves for backward during one
forward (summed over distinct storages, via saved_tensors_hooks: exact and repeatable on CPU, unlike
RSS; with checkpointing, only what the checkpoints keep), and on accelerators also the peak allocated
memory of one step above what was allocated before it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["lt", "inject_add", "inject_internal", "huginn", "parcae", "flt", "lt_i", "lt_ia", "flt_res",
         "ouro", "lt2_gates"]
PRESETS = {"flt350m": ROOT / "yaml_configs/flt_350m_8gpu.yaml"}


def saved_activation_bytes(fn):
    """Bytes of all tensors autograd saves for backward while fn runs (distinct storages)."""
    import torch
    seen = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


class Runner:
    """One model's training step under the chosen settings."""

    def __init__(self, model, loops, args, device, acc, train_cfg):
        import torch
        from megaloop.training.optim import build_optimizer
        self.model, self.loops, self.args, self.acc = model, loops, args, acc
        self.device_type = torch.device(device).type
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = None
        if args.optim:
            self.opt = build_optimizer(model, train_cfg, self.device_type)
        self.autocast = lambda: torch.autocast(self.device_type, dtype=torch.bfloat16,
                                               enabled=args.precision == "bf16")

    def forward(self, x, y):
        with self.autocast():
            return self.model(x, labels=y, loops=self.loops)

    def step(self, x, y):
        import torch
        self.forward(x, y).loss.backward()
        if self.opt is not None:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            for p in self.params:
                p.grad = None

    def block(self, x, y, n: int) -> float:
        """Seconds per step over n steps: process CPU time on cpu, wall time (one sync) elsewhere."""
        cpu = self.device_type == "cpu"
        self.acc.synchronize()
        t0 = time.process_time() if cpu else time.perf_counter()
        for _ in range(n):
            self.step(x, y)
        self.acc.synchronize()
        return ((time.process_time() if cpu else time.perf_counter()) - t0) / n

    def calibrate(self, x, y, min_seconds: float) -> int:
        """Warm up (compilation happens here), then the block length lasting >= min_seconds."""
        self.block(x, y, 2)
        one = self.block(x, y, 1)
        return max(1, math.ceil(min_seconds / max(one, 1e-6)))

    def peak_bytes(self, x, y):
        """Peak allocated memory of one step above the memory allocated before it (accelerators)."""
        if self.device_type == "cpu":
            return None
        self.acc.synchronize()
        base = self.acc.memory_allocated()
        self.acc.reset_peak_memory_stats()
        self.step(x, y)
        self.acc.synchronize()
        return self.acc.max_memory_allocated() - base


def build_pair(cfg, loops: int, args, device):
    """(looped model, plain model with n_loop * R layers) on device, same layer options and widths."""
    import torch
    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.model.compile import compile_layers
    m = cfg.model
    torch.manual_seed(0)
    looped = build_model(cfg)
    looped.block.activation_checkpointing = args.ac
    # The reference: same layer code, same width, n_loop * R distinct layers, run once. We keep the
    # architecture's own layer options (norm style, MLP, qk-norm) but no looping machinery.
    plain_cfg = load_config(None, [
        f"model.vocab_size={m.vocab_size}", f"model.pad_vocab_multiple={m.pad_vocab_multiple}",
        f"model.d_model={m.d_model}", f"model.n_heads={m.n_heads}", f"model.n_kv_heads={m.kv_heads}",
        f"model.head_dim={m.attn_head_dim}", f"model.ffn_hidden={m.ffn_dim}", f"model.mlp={m.mlp}",
        f"model.norm_style={m.norm_style}", f"model.qk_norm={m.qk_norm}", f"model.tie_embeddings={m.tie_embeddings}",
        f"model.max_seq_len={cfg.data.seq_len}", f"data.seq_len={cfg.data.seq_len}",
        f"model.n_prelude={m.n_prelude}", f"model.n_coda={m.n_coda}", f"model.n_loop={m.n_loop * loops}",
        "model.loops=1", f"model.mixer={m.mixer}", f"model.linear_mixer={m.linear_mixer}",  # patterns tile along depth
        f"model.window={m.window}", f"model.dsa_topk={m.dsa_topk}", f"model.dsa_index_heads={m.dsa_index_heads}",
        f"model.dsa_index_dim={m.dsa_index_dim}", f"model.gdn_expand_v={m.gdn_expand_v}",
        f"model.conv_size={m.conv_size}", f"model.gdn_kernel={m.gdn_kernel}"])
    plain = build_model(plain_cfg)
    plain.block.activation_checkpointing = "layer" if args.ac in ("loop", "layer") else "none"
    looped.to(device).train()
    plain.to(device).train()
    if args.compile:
        compile_layers(looped, mode=args.compile_mode)
        compile_layers(plain, mode=args.compile_mode)
    return looped, plain


def bench(cfg, loops: int, args, device, acc):
    import torch
    looped, plain = build_pair(cfg, loops, args, device)
    batch, seq = args.batch, cfg.data.seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=g).to(device)
    y = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=g).to(device)
    rl, rp = Runner(looped, loops, args, device, acc, cfg.train), Runner(plain, 1, args, device, acc, cfg.train)
    nl, np_ = rl.calibrate(x, y, args.min_seconds), rp.calibrate(x, y, args.min_seconds)
    t_loop, t_plain = [], []
    for _ in range(args.repeats):  # interleaved, so slow phases of the machine hit both
        t_loop.append(rl.block(x, y, nl))
        t_plain.append(rp.block(x, y, np_))
    _, act_loop = saved_activation_bytes(lambda: rl.forward(x, y))
    _, act_plain = saved_activation_bytes(lambda: rp.forward(x, y))
    for p in list(looped.parameters()) + list(plain.parameters()):
        p.grad = None
    peak_loop, peak_plain = rl.peak_bytes(x, y), rp.peak_bytes(x, y)
    tokens = batch * seq
    res = {"tl": tokens / min(t_loop), "tp": tokens / min(t_plain), "al": act_loop, "ap": act_plain,
           "pl": peak_loop, "pp": peak_plain,
           "params_l": sum(p.numel() for p in looped.parameters()), "params_p": sum(p.numel() for p in plain.parameters())}
    del looped, plain, rl, rp
    if torch.device(device).type != "cpu":
        acc.empty_cache()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=None, help=f"tiny configs (default: {','.join(ARCHS)})")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="flt350m: the issue's FLT 350M (d 1024, 24 shared layers), micro-batch 8 x 2048")
    ap.add_argument("--config", default=None, help="a YAML config instead of the tiny ones")
    ap.add_argument("--loops", default=None, help="comma list of R (default 1,4,12; 1,4 with --preset/--config)")
    ap.add_argument("--batch", type=int, default=None, help="default 8")
    ap.add_argument("--seq", type=int, default=None, help="default 64 (tiny) or the config's data.seq_len")
    ap.add_argument("--repeats", type=int, default=None, help="default 7 on cpu, 3 on accelerators")
    ap.add_argument("--min-seconds", type=float, default=None, help="block length (default 0.25 s cpu, 1 s else)")
    ap.add_argument("--device", default=None, help="default: DeepSpeed's accelerator (cpu, cuda:0, ...)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="default fp32 on cpu, bf16 (torch.autocast) on accelerators")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--ac", choices=["loop", "layer", "none"], default=None,
                    help="activation checkpointing (default: none for tiny configs, loop for --preset/--config)")
    ap.add_argument("--optim", action=argparse.BooleanOptionalAction, default=None,
                    help="include clip + AdamW (build_optimizer) in each step (default: on for --preset/--config)")
    ap.add_argument("--optimizer-impl", choices=["auto", "fused", "foreach", "for_loop"], default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = ap.parse_args(argv)
    if args.device is not None and args.device.startswith("cpu"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from deepspeed.accelerator import get_accelerator
    from megaloop.config import load_config

    acc = get_accelerator()
    device = args.device or acc.current_device_name()
    dev_type = torch.device(device).type
    if dev_type != "cpu" and dev_type != acc.device_name():
        sys.exit(f"--device {device}: DeepSpeed's accelerator is '{acc.device_name()}' (used for synchronize / "
                 f"memory stats); set DS_ACCELERATOR")
    big = args.preset is not None or args.config is not None
    args.precision = args.precision or ("fp32" if dev_type == "cpu" else "bf16")
    args.ac = args.ac or ("loop" if big else "none")
    args.optim = big if args.optim is None else args.optim
    args.repeats = args.repeats or (7 if dev_type == "cpu" else 3)
    args.min_seconds = args.min_seconds or (0.25 if dev_type == "cpu" else 1.0)
    args.batch = args.batch or 8
    loops_list = [int(v) for v in (args.loops or ("1,4" if big else "1,4,12")).split(",")]
    torch.set_num_threads(args.threads)

    if big:
        path = Path(args.config) if args.config else PRESETS[args.preset]
        name = path.stem
        seq_over = [f"data.seq_len={args.seq}", f"model.max_seq_len={args.seq}"] if args.seq else []
        configs = [(name, load_config(path, seq_over + list(args.overrides)))]
    else:
        seq = args.seq or 64
        configs = [(arch, load_config(ROOT / f"yaml_configs/tiny/{arch}.yaml",
                                      [f"data.seq_len={seq}", f"model.max_seq_len={seq}"] + list(args.overrides)))
                   for arch in (args.archs or ",".join(ARCHS)).split(",")]
    for _, cfg in configs:  # the optimizer settings of each config, with the chosen AdamW kernel
        cfg.train.optimizer_impl = args.optimizer_impl
    if args.optim:
        from megaloop.training.optim import optimizer_kernel
        opt_note = f"+ clip + AdamW {optimizer_kernel(args.optimizer_impl, dev_type)}"
    else:
        opt_note = "(no optimizer step)"
    timing = "process CPU time" if dev_type == "cpu" else "wall time"
    print(f"torch {torch.__version__}, device {device}" + (f", threads {torch.get_num_threads()}" if dev_type == "cpu" else "")
          + f"; batch {args.batch}; {args.precision}; activation checkpointing {args.ac}; compile "
            f"{'on' if args.compile else 'off'}; step = fwd + bwd {opt_note}; {timing}, best of {args.repeats} "
            f"interleaved blocks of >= {args.min_seconds:g} s")
    gpu = dev_type != "cpu"
    print(f"{'arch':16s} {'seq':>5s} {'R':>3s} {'looped tok/s':>13s} {'plain tok/s':>12s} {'ratio':>6s} "
          f"{'looped act MiB':>15s} {'plain act MiB':>14s}" + (f" {'looped peak GiB':>16s} {'plain peak GiB':>15s}"
                                                                if gpu else ""))
    for name, cfg in configs:
        for r in loops_list:
            res = bench(cfg, r, args, device, acc)
            line = (f"{name:16s} {cfg.data.seq_len:5d} {r:3d} {res['tl']:13,.0f} {res['tp']:12,.0f} "
                    f"{res['tl'] / res['tp']:6.3f} {res['al'] / 2**20:15.2f} {res['ap'] / 2**20:14.2f}")
            if gpu:
                line += f" {res['pl'] / 2**30:16.2f} {res['pp'] / 2**30:15.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
