"""Exported tokenizers load with AutoTokenizer and reproduce megaloop's ids exactly (byte and sentencepiece)."""
import json

import pytest
import torch

from megaloop.data.tokenizer import ByteTokenizer, build_tokenizer
from megaloop.export import export_hf
from export_support import perturbed_model, tiny_config

TEXTS = ["hello world", "alpha beta\n  gamma ✓ 日本", "", "x" * 50, "tabs\tand <b>markup</b>"]


def _auto_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=True)


def test_byte_tokenizer_round_trips(tmp_path):
    cfg = tiny_config("lt")
    out = export_hf(perturbed_model(cfg).state_dict(), cfg, cfg.data, tmp_path / "m", verify=False)
    tok, ref = _auto_tokenizer(out), ByteTokenizer()
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ref.encode(text)
        assert tok.decode(ids) == text
    assert (tok.eos_token_id, tok.pad_token_id) == (ref.eod_id, ref.pad_id)
    assert tok.decode([104, 105, ref.eod_id, ref.pad_id], skip_special_tokens=True) == "hi"
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].sum().item() == 6
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 256 and gen["pad_token_id"] == 257


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from tools.train_tokenizer import main as train_main

    d = tmp_path_factory.mktemp("spm")
    corpus = d / "c.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "lambda"]
    with open(corpus, "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": " ".join(words[(i * j) % 8] for j in range(12)) + "\nnext line"}) + "\n")
    train_main(["--input", str(corpus), "--model-prefix", str(d / "spm"), "--vocab-size", "300",
                "--model-type", "bpe", "--num-threads", "1"])
    return str(d / "spm.model")


def test_sentencepiece_tokenizer_round_trips_and_the_model_runs(tmp_path, spm_model):
    cfg = tiny_config("lt", ["model.vocab_size=300", "data.tokenizer_type=sentencepiece",
                             f"data.tokenizer_model={spm_model}"])
    model = perturbed_model(cfg)
    out = export_hf(model.state_dict(), cfg, cfg.data, tmp_path / "m")
    assert (out / "tokenizer.model").is_file()
    tok, ref = _auto_tokenizer(out), build_tokenizer("sentencepiece", spm_model)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.eos_token_id == ref.eod_id and tok.pad_token_id == ref.pad_id
    assert tok.convert_ids_to_tokens(ref.eod_id) == "<eod>"
    # the tokenizer feeds the exported model
    from megaloop.export import load_exported

    hf = load_exported(out)
    ids = tok("alpha beta gamma", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, num_loops=3).logits, model(ids, loops=3).logits, rtol=0, atol=1e-5)
    # saving the loaded tokenizer elsewhere keeps the model file
    tok.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer.model").is_file()
