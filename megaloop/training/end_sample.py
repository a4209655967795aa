"""The end-of-run sample (train.sample_tokens): continue train.sample_prompt with the trained weights."""
from __future__ import annotations

import os


def sample_after_training(cfg, te, tokenizer, state, logger, out_dir: str) -> None:
    """The weights gathered to rank 0, then megaloop.generation: top-k sampling at train.sample_temperature
    (seeded), greedy at 0; printed and written to <output_dir>/sample.txt. Collective with PP > 1."""
    from megaloop.generation import generate, wrap_megaloop
    from megaloop.training.evaluation import eval_loop_counts
    t = cfg.train
    if state.tp_size > 1 or cfg.parallel.zero_stage == 3:
        logger.console("sample skipped: needs tensor_parallel 1 and zero_stage < 3")
        return
    lm = te.gathered_model()
    if lm is None:  # (not rank 0)
        return
    loops = eval_loop_counts(cfg)[0]  # (the first R of train.eval_loops; model.loops by default)
    out = generate(wrap_megaloop(lm, tokenizer), tokenizer.encode(t.sample_prompt),
                   max_new_tokens=t.sample_tokens, loops=loops, temperature=t.sample_temperature,
                   top_k=t.sample_top_k or None, seed=t.seed, stop_at_eos=False)
    text = tokenizer.decode(out.tokens[0].tolist())
    print(f"[megaloop] sample (R={loops}): {text!r}", flush=True)
    with open(os.path.join(out_dir, "sample.txt"), "w") as f:
        f.write(text + "\n")
