"""lm-evaluation-harness on a megaloop model at chosen loop counts, through the Hugging Face export.

The weights are exported (megaloop.export.export_hf) to a folder, which lm-eval's `hf` model loads as it
loads any remote-code model (`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,num_loops=4`
runs the same folder from the command line). The model is loaded once; each loop count R is set as the
exported config's `num_loops`, which every forward (and generate) reads when the call names no R.
Used by tools/eval_harness.py (a checkpoint) and the trainer's train.harness_interval (the current
weights; megaloop/training/harness.py). Needs `pip install -e .[eval]` (lm-eval, accelerate).

Rows: {"task": name, "R": R, "metrics": {metric: value}} with lm-eval's numeric metrics ("acc", "perplexity",
...; standard errors dropped, the ",none" filter suffix removed).
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megaloop.errors import MegaloopError


class HarnessError(MegaloopError, ValueError):
    """lm-eval is missing, or a task it does not know (the message names it and the fix)."""


def export_weights(state_dict, cfg, tokenizer_spec, folder) -> Path:
    """The HF folder lm-eval loads (megaloop.export.export_hf; the logits check is left to the exporter's
    own tests, this folder is temporary)."""
    from megaloop.export import export_hf
    return export_hf(state_dict, cfg, tokenizer_spec, folder, verify=False)


def task_manager(tasks: Sequence[str], include_path: Optional[str] = None):
    """lm-eval's TaskManager: only the tasks under include_path when they hold every requested task (indexing
    lm-eval's built-in tasks takes a while), else those plus the built-in ones. Unknown tasks: HarnessError."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise HarnessError(f"lm-evaluation-harness is not installed ({exc}): pip install -e '.[eval]'") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"the lm-eval task folder {include_path} does not exist")
    with _quiet():
        manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
        if manager is None or not set(tasks) <= set(manager.all_tasks):
            manager = TaskManager(include_path=include_path)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise HarnessError(f"lm-eval does not know the task(s) {', '.join(unknown)}"
                           + ("" if include_path else "; a task of your own: give the folder of its YAML file "
                              "(--include-path / train.harness_include_path)"))
    return manager


def run_harness(folder, tasks: Sequence[str], loops: Sequence[int], include_path: Optional[str] = None,
                limit: Optional[int] = None, batch_size: int = 8, num_fewshot: Optional[int] = None,
                device: str = "cpu", manager=None) -> List[dict]:
    """lm-eval's `tasks` on the exported `folder` at each R of `loops`: the rows (see the module doc)."""
    import lm_eval
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise HarnessError(f"lm-eval's hf model cannot be imported ({exc}): pip install -e '.[eval]'") from None
    manager = manager or task_manager(tasks, include_path)
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    rows = []
    for r in loops:
        model.config.num_loops = int(r)
        with _quiet():
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False,
                                          verbosity="ERROR")
        for task, metrics in out["results"].items():
            rows.append({"task": task, "R": int(r), "metrics": numeric_metrics(metrics)})
    return rows


def numeric_metrics(results: Dict[str, object]) -> Dict[str, float]:
    """lm-eval's per-task results -> {metric: value}: numbers only, no standard errors, filter suffix dropped
    ("acc,none" -> "acc"; another filter stays: "exact_match,strict-match" -> "exact_match_strict-match")."""
    out = {}
    for key, value in results.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or "_stderr" in key or key == "sample_len":
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric}_{re.sub(r'[^A-Za-z0-9_.-]', '_', filt)}"] = float(value)
    return out


@contextlib.contextmanager
def _quiet():
    """lm-eval and transformers report every stage (warnings about a pre-loaded model, progress bars):
    kept to errors while megaloop prints its own lines."""
    names = ("lm-eval", "lm_eval", "transformers", "datasets", "accelerate")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
