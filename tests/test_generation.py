"""megaloop.generation: sampler, megaloop vs exported generation, tools/generate.py, tools/eval_loops.py."""
import csv
import dataclasses
import json

import pytest
import torch

from megaloop.checkpoint import save_plain_checkpoint
from megaloop.export import export_hf
from export_support import perturbed_model, tiny_config
from megaloop.generation import generate, load_lm, sample_next_token, wrap_megaloop


def test_sampler_temperature_top_p_top_k():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]]).repeat(2000, 1)
    assert sample_next_token(logits[:1], temperature=0).tolist() == [0]
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, temperature=1.0, top_p=0.5, generator=g)
    assert set(draws.tolist()) == {0}  # p(0) = 0.66 >= 0.5: only the top token survives
    draws = sample_next_token(logits, temperature=1.0, top_p=0.9, generator=g)
    assert set(draws.tolist()) == {0, 1}  # 0.66 + 0.24 = 0.90 reaches 0.9 before token 2
    draws = sample_next_token(logits, temperature=1.0, top_k=3, generator=g)
    assert set(draws.tolist()) == {0, 1, 2}
    hot = sample_next_token(logits, temperature=100.0, generator=g)
    assert (hot == 3).any()  # a flat distribution reaches the unlikely token
    a = sample_next_token(logits[:50], 1.0, 0.95, generator=torch.Generator().manual_seed(1))
    b = sample_next_token(logits[:50], 1.0, 0.95, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    cfg = tiny_config("flt")
    model = perturbed_model(cfg)
    ckpt = save_plain_checkpoint(model, cfg, root / "run" / "model.pt")
    out = export_hf(model.state_dict(), cfg, cfg.data, root / "hf", verify=False)
    return cfg, model, ckpt, out


def test_megaloop_and_exported_generation_agree(pair):
    cfg, model, ckpt, out = pair
    a, b = load_lm(ckpt), load_lm(out)
    assert (a.kind, b.kind) == ("megaloop", "hf") and a.train_loops == b.train_loops == 4
    prompt = a.encode("The loop ")
    assert prompt == b.encode("The loop ")
    for loops in (1, 5):
        ga = generate(a, prompt, max_new_tokens=10, loops=loops, temperature=0)
        gb = generate(b, prompt, max_new_tokens=10, loops=loops, temperature=0)
        assert torch.equal(ga.tokens, gb.tokens)
        sa = generate(a, prompt, max_new_tokens=10, loops=loops, temperature=0.9, top_p=0.9, seed=3)
        sb = generate(b, prompt, max_new_tokens=10, loops=loops, temperature=0.9, top_p=0.9, seed=3)
        assert torch.equal(sa.tokens, sb.tokens)
    # HF's own generate() agrees with the shared greedy sampler
    hf_ids = b.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, num_loops=5,
                              eos_token_id=None, pad_token_id=257)
    assert torch.equal(hf_ids, generate(b, prompt, max_new_tokens=10, loops=5, temperature=0,
                                        stop_at_eos=False).tokens)
    assert isinstance(a.decode(ga.new_tokens[0].tolist()), str)


def test_exit_reports_average_loops():
    cfg = tiny_config("ouro")
    lm = wrap_megaloop(perturbed_model(cfg))
    out = generate(lm, [1, 2, 3], max_new_tokens=4, loops=6, temperature=0, exit="kl", exit_threshold=1e9)
    assert out.mean_loops == 2.0
    out = generate(lm, [1, 2, 3], max_new_tokens=4, loops=6, temperature=0)
    assert out.mean_loops == 6.0 and out.new_tokens.shape == (1, 4)


def test_generate_tool(pair, capsys):
    from tools.generate import main

    _, _, ckpt, out = pair
    for src in (ckpt, out):
        main(["--model", str(src), "--prompt", "ab", "--max-new-tokens", "5", "--loops", "2",
              "--temperature", "0.7", "--top-p", "0.9", "--seed", "0"])
        text = capsys.readouterr().out
        assert text.startswith("ab") or "ab" in text


def test_eval_loops_tool(pair, tmp_path, capsys):
    from tools.eval_loops import main

    cfg, _, ckpt, out = pair
    text = tmp_path / "val.txt"
    text.write_text("the looped transformer runs its block again and again. " * 40)
    res = tmp_path / "res"
    main(["--model", str(out), "--text", str(text), "--seq-len", "32", "--max-windows", "4",
          "--exits", "kl:1e-2", "--out-dir", str(res)])
    rows = list(csv.DictReader(open(res / "eval_loops.csv")))
    fixed = [r for r in rows if r["mode"] == "fixed"]
    assert [int(r["loops"]) for r in fixed] == list(range(1, 9))  # 1 .. 2x the training value (4)
    assert all(float(r["ppl"]) > 1 for r in rows)
    kl = [r for r in rows if r["mode"] == "kl"]
    assert len(kl) == 1 and 1 <= float(kl[0]["avg_loops"]) <= 8
    printed = capsys.readouterr().out
    assert "ppl" in printed and ("eval_loops.png" in printed or "matplotlib" in printed)


def test_eval_loops_reads_an_indexed_dataset(pair, tmp_path):
    import numpy as np

    from megaloop.data.indexed_dataset import IndexedDatasetWriter
    from megaloop.evaluation.inputs import eval_split, load_eval_tokens
    from tools.eval_loops import main

    _, _, ckpt, _ = pair
    prefix = str(tmp_path / "val_text_document")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in range(100):
            w.add_document(np.arange(d, d + 40) % 256)
    lm = load_lm(ckpt)
    tokens = load_eval_tokens(lm, data=prefix, split="90,10,0")
    assert tokens.size == 10 * 40 and tokens[0] == 90  # the validation documents 90..99
    res = tmp_path / "res"
    main(["--model", str(ckpt), "--data", prefix, "--split", "90,10,0", "--seq-len", "32", "--loops", "1,3",
          "--exits", "--out-dir", str(res), "--json", str(tmp_path / "a.json")])
    assert [r["loops"] for r in csv.DictReader(open(res / "eval_loops.csv"))] == ["1", "3"]
    assert json.load(open(tmp_path / "a.json"))["tokens"] == 12 * 32  # 10 documents: 399 labels, 12 windows
    # Without --split, a run evaluated on its own dataset gets its data.split's validation documents.
    cfg, model, _, _ = pair
    own = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_path=[prefix], split="80,20,0"))
    own_ckpt = save_plain_checkpoint(model, own, tmp_path / "own" / "model.pt")
    main(["--model", str(own_ckpt), "--data", prefix, "--seq-len", "32", "--loops", "1", "--exits",
          "--out-dir", str(res), "--json", str(tmp_path / "b.json")])
    assert json.load(open(tmp_path / "b.json"))["tokens"] == 24 * 32  # 20 documents
    assert eval_split(ckpt, None, prefix) == "969,30,1"  # another run's data: Megatron's default
