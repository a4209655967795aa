"""Issue 20, "tokenizers at every stage": Hugging Face tokenizer.json (tokenizer_type hf, Megatron's
HuggingFaceTokenizer) and tiktoken files, through train_tokenizer --type bpe, preprocessing, the dataset
record, training (init.from an imported folder), the end-of-run sample, the export (plain AutoTokenizer)
and the tools that load an export."""
import json
import os
import shutil

import numpy as np
import pytest

from megaloop.config import ConfigError, config_from_dict
from megaloop.data.dataset_tokenizer import DatasetTokenizerError, check_dataset_tokenizer, file_sha256, read_sidecar
from megaloop.data.indexed_dataset import IndexedDataset
from megaloop.data.tokenizer import TokenizerError, build_tokenizer
from megaloop.data.tokenizer_hf import HFTokenizer, TiktokenTokenizer, train_bpe

TEXTS = ["def foo(x):\n    return x + 1  # héllo ✓", "The quick brown fox jumps over the lazy dog.",
         "Σ ελληνικά, 中文, emoji 🙂 and tabs\tand  spaces", "1234567890 + 42 = 1234567932"]


def _corpus(words, n=300):
    return [" ".join(words[(i * j + j) % len(words)] for j in range(14)) + f" {i}" for i in range(n)]


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """Two byte-level BPE folders of 300 ids trained on different text (tools/train_tokenizer.py --type bpe),
    and a corpus."""
    from tools.train_tokenizer import main as train_main

    root = tmp_path_factory.mktemp("hf_tok")
    corpus = _write_jsonl(root / "corpus.jsonl", _corpus(["alpha", "beta", "gamma", "delta", "return", "self"]) + TEXTS)
    other = _write_jsonl(root / "other.jsonl", _corpus(["one", "two", "three", "four", "five", "six"]))
    assert train_main(["--type", "bpe", "--input", corpus, "--model-prefix", str(root / "bpe"), "--vocab-size",
                       "300", "--num-threads", "1"]) == 0
    assert train_main(["--type", "bpe", "--input", other, "--model-prefix", str(root / "bpe_b"), "--vocab-size",
                       "300", "--num-threads", "1"]) == 0
    return {"root": root, "dir": str(root / "bpe"), "json": str(root / "bpe" / "tokenizer.json"),
            "other": str(root / "bpe_b"), "corpus": corpus}


def test_hf_tokenizer_round_trips_and_matches_transformers(bpe):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(bpe["dir"])
    for path in (bpe["dir"], bpe["json"]):  # the folder or the file itself
        tok = build_tokenizer("HuggingFaceTokenizer", path)
        assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300 == len(reference)
        assert (tok.eod_id, tok.pad_id) == (0, 1) == (reference.eos_token_id, reference.pad_token_id)
        for text in TEXTS:
            ids = tok.encode(text)
            assert ids == reference(text).input_ids and tok.decode(ids) == text
        assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
        # ids of a model vocabulary padded past the tokenizer's, and the specials, have no text
        assert tok.decode(tok.encode("abc") + [tok.eod_id, 310]) == "abc"
    assert set(os.listdir(bpe["dir"])) == {"tokenizer.json", "tokenizer_config.json"}  # no temporary left


def test_the_end_of_document_token(bpe, tmp_path):
    bare = tmp_path / "bare.json"
    shutil.copyfile(bpe["json"], bare)  # no tokenizer_config.json beside it: found by its name
    assert HFTokenizer(bare).eod_id == 0
    train_bpe(iter(_corpus(["a", "b"], 20)), tmp_path / "odd", 270, eod_token="<|doc|>", pad_token="<|p|>")
    os.remove(tmp_path / "odd" / "tokenizer_config.json")
    with pytest.raises(TokenizerError, match=r"cannot tell the end-of-document token .* --tokenizer-eod TOKEN"):
        build_tokenizer("hf", str(tmp_path / "odd"))
    assert build_tokenizer("hf", str(tmp_path / "odd"), eod_token="<|doc|>").eod_id == 0
    with pytest.raises(TokenizerError, match=r"'<\|nope\|>' is not a token"):
        build_tokenizer("hf", str(tmp_path / "odd"), eod_token="<|nope|>")
    with pytest.raises(TokenizerError, match="applies to hf and tiktoken"):
        build_tokenizer("sentencepiece", bpe["json"], eod_token="<|doc|>")


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory):
    """A small .tiktoken file: the 256 bytes, then a few merges."""
    import base64

    pytest.importorskip("tiktoken")  # setup.py extra `data`
    path = tmp_path_factory.mktemp("tiktoken") / "tiny.tiktoken"
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the", b"in", b"ing", b" q"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return str(path)


def test_tiktoken_round_trips(tiktoken_file):
    tok = build_tokenizer("tiktoken", tiktoken_file)
    assert isinstance(tok, TiktokenTokenizer) and (tok.vocab_size, tok.eod_id) == (263, 262)
    assert tok.encode(" the thing") == [258, 32, 256, 260]  # ' the' | ' ', 'th', 'ing': cl100k's split, then merges
    for text in TEXTS + ["<|endoftext|> stays text"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    # The export's tokenizer.json (transformers' TikTokenConverter) gives the same ids.
    converted = tok.to_hf_tokenizer()
    assert [converted.encode(t, add_special_tokens=False).ids for t in TEXTS] == tok.encode_batch(TEXTS)


def _pipeline(tokenizer_json, kind):
    """The trained BPE as GPT-2 has it, or split as Llama 3 (Split + ByteLevel, a BOS added; Qwen: + NFC)."""
    from tokenizers import Tokenizer as RustTokenizer

    from megaloop.data.tokenizer_hf import CL100K_PATTERN

    spec = json.load(open(tokenizer_json))
    if kind in ("llama3", "qwen"):
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CL100K_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        spec["post_processor"] = {"type": "TemplateProcessing", "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                                  "single": [{"SpecialToken": {"id": "<|pad|>", "type_id": 0}},
                                             {"Sequence": {"id": "A", "type_id": 0}}],
                                  "special_tokens": {"<|pad|>": {"id": "<|pad|>", "ids": [1], "tokens": ["<|pad|>"]}}}
    if kind == "qwen":
        spec["normalizer"] = {"type": "NFC"}
    if kind == "digits":  # a \d pattern: not a shape the fast path takes
        spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "\\d+|\\D+"}, "behavior": "Isolated",
                                 "invert": False}
    return RustTokenizer.from_str(json.dumps(spec))


def test_the_piece_cache_gives_the_tokenizers_ids(bpe, monkeypatch):
    """piece_cache.py (Python split, BPE once per distinct piece) equals encode_batch_fast on text mixing
    scripts, Unicode spaces, combining marks, astral letters (refused, so the tokenizers path), emoji,
    contractions in either case, and a literal added token; also after the piece dict is emptied."""
    import random

    from megaloop.data import piece_cache

    monkeypatch.setattr(piece_cache, "MAX_PIECES", 50)
    rng = random.Random(0)
    alphabet = (list("abcdefgXYZ0123456789") * 3 + [" "] * 12 + list("\n\n\t\r'!?.,_(){}#<>") +
                list("éüßÅαβΣ中文한١٢½²") + ["\u00a0", "\u2028", "\x85", "\x1c", "\u3000", "\u0301", "\ufeff"] +
                ["🙂", "👍🏽", "𝐀", "𠀀", "ſ", "K", "<|endoftext|>", "'S", "'ll", "’s"])
    texts = TEXTS + ["", "   \n\n  ", "it's 'LL"] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))
                                                    for _ in range(300)]
    for kind in ("gpt2", "llama3", "qwen", "digits"):
        tok = _pipeline(bpe["json"], kind)
        fast = piece_cache.FastEncoder.build(tok)
        assert (fast is None) == (kind == "digits"), kind
        if fast is not None:
            assert fast.encode_batch(texts) == [e.ids for e in tok.encode_batch_fast(texts)], kind
            # NFC (qwen) leaves ASCII alone only: other documents take the tokenizers path, unprobed
            assert ("𝐀" in fast.refused, "é" in fast.verified) == ((kind != "qwen"),) * 2, kind


def test_preprocess_with_megatrons_flags_records_and_refuses(bpe, tmp_path):
    from transformers import AutoTokenizer

    from tools.preprocess_data import main

    prefix = str(tmp_path / "hf")
    assert main(["--input", bpe["corpus"], "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                 "--tokenizer-model", bpe["dir"], "--append-eod", "--workers", "2", "--chunk-bytes", "4096",
                 "--quiet"]) == 0
    data = prefix + "_text_document"
    reference = AutoTokenizer.from_pretrained(bpe["dir"])
    texts = [json.loads(line)["text"] for line in open(bpe["corpus"])]
    ds = IndexedDataset(data)
    assert len(ds) == len(texts)
    for i in (0, 7, len(texts) - 1):
        assert ds[i].tolist() == reference(texts[i]).input_ids + [reference.eos_token_id]
    record = read_sidecar(data)
    assert (record["type"], record["vocab_size"], record["eod_id"]) == ("hf", 300, 0)
    assert record["model_sha256"] == file_sha256(bpe["json"]) and record["model"] == bpe["json"]
    check_dataset_tokenizer(data, {"type": "hf", "model": bpe["json"]})  # the file or its folder: the same one
    with pytest.raises(DatasetTokenizerError, match=r"another tokenizer model file"):
        check_dataset_tokenizer(data, {"type": "HuggingFaceTokenizer", "model": bpe["other"]})
    with pytest.raises(DatasetTokenizerError, match=r"was tokenized with hf .*uses byte.*another tokenizer type"):
        check_dataset_tokenizer(data, config_from_dict({}))


def test_bad_tokenizers_are_one_line_and_exit_2(bpe, tmp_path, capsys):
    from tools.preprocess_data import main

    corpus = _write_jsonl(tmp_path / "c.jsonl", ["hello"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.json").write_text('{"model": {"type": "BPE", "vocab": ')
    for model, pattern in [(str(tmp_path / "empty"), "holds no tokenizer.json"),
                           (str(tmp_path / "missing"), "no such file or folder"),
                           (str(tmp_path / "broken.json"), "cannot read Hugging Face tokenizer")]:
        assert main(["--input", corpus, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "hf",
                     "--tokenizer-model", model, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err
    assert not list(tmp_path.glob("o_*"))
    with pytest.raises(ConfigError, match=r"data.tokenizer_type='HuggingFaceTokenizer' needs data.tokenizer_model"):
        config_from_dict({"data": {"tokenizer_type": "HuggingFaceTokenizer"}})
    with pytest.raises(ConfigError, match=r"not one of byte, sentencepiece, hf, tiktoken"):
        config_from_dict({"data": {"tokenizer_type": "gpt2bpe"}})


@pytest.fixture(scope="module")
def llama_with_bpe(bpe):
    """A tiny LlamaForCausalLM folder (vocabulary 320) holding the 300-id BPE tokenizer, as HF model folders do."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = bpe["root"] / "llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(bpe["dir"], name), folder / name)
    return folder


def test_import_preprocess_init_from_train_export_with_one_tokenizer(bpe, llama_with_bpe, tmp_path):
    """import_hf carries the folder's tokenizer into the run folder and its config; preprocessing names the run
    folder; init.from trains on it (the end-of-run sample decodes with it); the export's tokenizer is the same
    tokenizer.json, loaded by plain AutoTokenizer and by generate / eval_loops."""
    from test_train_support import assert_ok, run_ranks
    from transformers import AutoTokenizer

    from megaloop.checkpoint import load_config
    from megaloop.hf_import import import_hf
    from megaloop.evaluation.inputs import load_model_for_cli, model_tokenizer_reference
    from tools.export_hf import main as export_main
    from tools.preprocess_data import main as preprocess_main

    run = tmp_path / "imported"
    import_hf(llama_with_bpe, run)
    cfg = load_config(run)
    assert (cfg.data.tokenizer_type, cfg.data.tokenizer_model) == ("hf", str(run / "tokenizer.json"))
    assert file_sha256(run / "tokenizer.json") == file_sha256(bpe["json"])
    assert preprocess_main(["--input", bpe["corpus"], "--output-prefix", str(tmp_path / "c"), "--tokenizer-type",
                            "HuggingFaceTokenizer", "--tokenizer-model", str(run), "--append-eod", "--quiet"]) == 0
    data = str(tmp_path / "c_text_document")
    out = tmp_path / "train"
    results = run_ranks(1, ["--config", str(run / "config.yaml"), f"init.from={run}", f"train.output_dir={out}",
                            f"data.data_path=[{data}]", "data.seq_len=32", "data.split=95,5,0", "train.steps=2",
                            "train.micro_batch_size=2", "train.tensorboard=false", "train.eval_interval=0",
                            "train.sample_tokens=4", "train.sample_prompt=alpha beta"], timeout=240)
    assert_ok(results)
    assert "initialised the weights from" in results[0][1]
    assert (out / "sample.txt").read_text().startswith("alpha beta")  # the end-of-run sample, decoded by it
    export = tmp_path / "export"
    assert export_main(["--checkpoint", str(out), "--output", str(export)]) == 0
    assert file_sha256(export / "tokenizer.json") == file_sha256(bpe["json"])
    plain = AutoTokenizer.from_pretrained(export)  # no trust_remote_code
    ours = HFTokenizer(bpe["dir"])
    assert [plain(t).input_ids for t in TEXTS] == ours.encode_batch(TEXTS) and plain.eos_token_id == ours.eod_id
    lm = load_model_for_cli(str(export))
    assert lm.encode(TEXTS[0]) == ours.encode(TEXTS[0]) and lm.eos_id == 0
    check_dataset_tokenizer(data, model_tokenizer_reference(str(export)))  # the export's tokenizer is the data's


def test_a_tokenizer_larger_than_the_model_is_refused_at_import(bpe, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaloop.errors import run_cli
    from tools.import_hf import _main

    folder = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    shutil.copyfile(bpe["json"], folder / "tokenizer.json")
    capsys.readouterr()  # (transformers' progress bar)
    assert run_cli(_main, ["--model", str(folder), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 300 ids but the model's vocabulary (model.vocab_size) has 200" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_tiktoken_run_exports_a_plain_tokenizer_json(tiktoken_file, tmp_path):
    from export_support import perturbed_model, tiny_config
    from transformers import AutoTokenizer

    from megaloop.export import export_hf

    cfg = tiny_config("lt", ["model.vocab_size=263", "data.tokenizer_type=tiktoken",
                             f"data.tokenizer_model={tiktoken_file}"])
    out = export_hf(perturbed_model(cfg).state_dict(), cfg, cfg.data, tmp_path / "m", verify=False)
    plain, ours = AutoTokenizer.from_pretrained(out), build_tokenizer("tiktoken", tiktoken_file)
    assert [plain(t).input_ids for t in TEXTS] == ours.encode_batch(TEXTS)
    assert (plain.eos_token_id, plain.eos_token) == (262, "<|endoftext|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 262
    small = tiny_config("lt", ["model.vocab_size=200", "data.tokenizer_type=tiktoken",
                               f"data.tokenizer_model={tiktoken_file}"])
    from megaloop.export import ExportError
    with pytest.raises(ExportError, match="the tokenizer has 263 ids but model.vocab_size=200"):
        export_hf(perturbed_model(small).state_dict(), small, small.data, tmp_path / "small", verify=False)
