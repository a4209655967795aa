"""Tokenizers: byte-level round trip, sentencepiece training tool and wrapper."""
import json

import pytest

from megaloop.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, build_tokenizer


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("byte")
    text = "héllo wörld — 你好\n\tend"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.vocab_size == 258
    assert tok.decode(ids + [tok.eod_id, tok.pad_id]) == text
    assert [list(a) for a in tok.encode_batch(["ab", ""])] == [[97, 98], []]
    assert {tok.eod_id, tok.pad_id} == {256, 257}


def test_build_tokenizer_errors():
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        build_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="needs a model file"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(ValueError, match="cannot load"):
        build_tokenizer("sentencepiece", "/nonexistent.model")
    assert isinstance(build_tokenizer("ByteTokenizer"), ByteTokenizer)


def test_train_tokenizer_tool_and_wrapper(tmp_path):
    from tools.train_tokenizer import main as train_main

    corpus = tmp_path / "c.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "lambda"]
    with open(corpus, "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": " ".join(words[(i * j) % 8] for j in range(12)) + "\nnext line"}) + "\n")
    prefix = str(tmp_path / "spm")
    train_main(["--input", str(corpus), "--model-prefix", prefix, "--vocab-size", "300", "--model-type", "bpe",
                "--num-threads", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "spm.model", "spm.vocab"]

    tok = build_tokenizer("sentencepiece", prefix + ".model")
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 300
    assert tok.sp.id_to_piece(tok.eod_id) == "<eod>" and tok.sp.id_to_piece(tok.pad_id) == "<pad>"
    text = "alpha beta\n  gamma ✓"  # newline, double space and a char never seen: byte fallback keeps them
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "beta"]) == [tok.encode(text), tok.encode("beta")]
