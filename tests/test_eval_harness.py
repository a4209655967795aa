"""tools/eval_harness.py: lm-evaluation-harness on a checkpoint at chosen loop counts, through the HF export,
with a local task (a YAML over a jsonl, nothing downloaded); the metric read back equals the perplexity
computed from the megaloop model itself at each R. The trainer's train.harness_interval is tested in
tests/test_eval_training.py (same task, same reference)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

TASK = "megaloop_tiny"
DOCS = [{"context": f"def f{i}(x):\n    return", "continuation": f" x + {i}"} for i in range(6)]


def write_tiny_task(folder):
    """A loglikelihood task over a local jsonl: lm-eval's perplexity and greedy accuracy of each continuation."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return str(folder)


def reference_perplexity(model, loops):
    """exp(-mean log p(continuation | context)) over DOCS, byte ids (lm-eval adds no BOS to this model)."""
    lls = []
    for d in DOCS:
        ctx, cont = list(d["context"].encode()), list(d["continuation"].encode())
        ids = torch.tensor(ctx + cont)
        with torch.no_grad():
            logp = F.log_softmax(model(ids[None, :-1], loops=loops).logits[0].double(), -1)
        lls.append(float(logp[len(ctx) - 1:].gather(-1, ids[len(ctx):, None]).sum()))
    return math.exp(-sum(lls) / len(lls))


def test_tool_scores_a_local_task_at_each_R(tmp_path, monkeypatch, capsys):
    from export_support import perturbed_model, tiny_config
    from megaloop.checkpoint import save_plain_checkpoint
    from tools import eval_harness
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_config("lt")
    model = perturbed_model(cfg)
    ckpt = save_plain_checkpoint(model, cfg, tmp_path / "run" / "model.pt")
    tasks, js = write_tiny_task(tmp_path / "tasks"), tmp_path / "res.json"
    assert eval_harness.main([str(ckpt), "--tasks", TASK, "--loops", "1,3", "--include-path", tasks,
                              "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [(r["task"], r["R"]) for r in rows] == [(TASK, 1), (TASK, 3)]
    ppl = {r["R"]: r["metrics"]["perplexity"] for r in rows}
    for r in (1, 3):
        assert ppl[r] == pytest.approx(reference_perplexity(model, r), rel=1e-4)
    assert ppl[1] != pytest.approx(ppl[3], rel=1e-3)  # (R reached the model)
    assert 0.0 <= rows[0]["metrics"]["acc"] <= 1.0 and f"{TASK}    3           perplexity" in capsys.readouterr().out
    # an unknown task is one line, before any export
    assert eval_harness.main([str(ckpt), "--tasks", "no_such_task", "--include-path", tasks]) == 2
    assert "no_such_task" in capsys.readouterr().err


def test_the_trainers_harness_leaves_the_global_rngs_as_they_were():
    """lm-eval seeds Python's, numpy's and torch's generators; rank 0 trains on afterwards as if it had not."""
    import random

    import numpy as np
    from megaloop.training.harness import _global_rngs_kept
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    want = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    with _global_rngs_kept():
        torch.manual_seed(1234), random.seed(0), np.random.seed(1234)  # what simple_evaluate does
    got = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
