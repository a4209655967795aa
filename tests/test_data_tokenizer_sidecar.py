"""Issue 12, item 5: a dataset made with another tokenizer is refused, not scored.

tools/preprocess_data.py records the tokenizer next to the data ({prefix}.tokenizer.json); the trainer's
dataset builder and tools/eval_loops.py refuse a model with another tokenizer in one line naming the
dataset; datasets without the record (Megatron-LM) still get the token-id range check."""
import json

import numpy as np
import pytest

from megaloop.config import ConfigError
from megaloop.data.dataset_tokenizer import (DatasetTokenizerError, check_dataset_tokenizer, file_sha256,
                                             read_sidecar, sidecar_path)
from megaloop.data.indexed_dataset import IndexedDatasetWriter
from megaloop.data.preprocess import PreprocessConfig, preprocess


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _train_spm(root, name, words):
    from tools.train_tokenizer import main as train_main

    corpus = _write_jsonl(root / f"{name}.jsonl",
                          [" ".join(words[(i * j) % len(words)] for j in range(12)) for i in range(300)])
    train_main(["--input", corpus, "--model-prefix", str(root / name), "--vocab-size", "300",
                "--num-threads", "1"])
    return str(root / f"{name}.model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two sentencepiece models with the same vocabulary size, and a byte and a sentencepiece dataset."""
    root = tmp_path_factory.mktemp("sidecar")
    spm_a = _train_spm(root, "spm_a", ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"])
    spm_b = _train_spm(root, "spm_b", ["one", "two", "three", "four", "five", "six", "seven", "eight"])
    texts = [f"alpha beta gamma {i} delta epsilon zeta theta {i * 3}" for i in range(200)]
    corpus = _write_jsonl(root / "corpus.jsonl", texts)
    preprocess(PreprocessConfig([corpus], str(root / "byte"), append_eod=True, show_progress=False))
    preprocess(PreprocessConfig([corpus], str(root / "sp"), tokenizer_type="sentencepiece", tokenizer_model=spm_a,
                                append_eod=True, workers=2, show_progress=False))
    return {"root": root, "spm_a": spm_a, "spm_b": spm_b, "byte": str(root / "byte_text_document"),
            "sp": str(root / "sp_text_document")}


def test_preprocessing_records_the_tokenizer(data, tmp_path, capsys):
    rec = json.loads(open(sidecar_path(data["byte"])).read())
    assert rec["type"] == "byte" and rec["vocab_size"] == 258 and rec["model_sha256"] is None and rec["eod_id"] == 256
    rec = read_sidecar(data["sp"])
    assert rec["type"] == "sentencepiece" and rec["vocab_size"] == 300
    assert rec["model_sha256"] == file_sha256(data["spm_a"]) and rec["model"].endswith("spm_a.model")
    # the CLI writes it too, atomically: no temporary left behind
    from tools.preprocess_data import main

    corpus = _write_jsonl(tmp_path / "c.jsonl", ["hello", "world"])
    assert main(["--input", corpus, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "byte",
                 "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "c.jsonl", "o_text_document.bin", "o_text_document.idx", "o_text_document.tokenizer.json"]


@pytest.mark.parametrize("dataset, reference, why", [
    ("byte", "spm_a", "another tokenizer type"),
    ("sp", "byte", "another tokenizer type"),
    ("sp", "spm_b", "another tokenizer model file"),
])
def test_mismatch_is_refused_in_one_line_naming_the_dataset(data, dataset, reference, why):
    ref = {"type": "byte", "model": None} if reference == "byte" else \
        {"type": "sentencepiece", "model": data[reference]}
    with pytest.raises(DatasetTokenizerError) as err:
        check_dataset_tokenizer(data[dataset], ref)
    msg = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in msg
    assert data[dataset] in msg and why in msg, msg


def test_matching_tokenizer_missing_record_and_unreadable_record(data, tmp_path):
    from megaloop.config import load_config
    from megaloop.data.tokenizer import build_tokenizer

    check_dataset_tokenizer(data["byte"], {"type": "byte", "model": None})
    check_dataset_tokenizer(data["byte"], load_config(None))  # a Config: data.tokenizer_type byte
    check_dataset_tokenizer(data["sp"], build_tokenizer("sentencepiece", data["spm_a"]))
    check_dataset_tokenizer(data["sp"], {"type": "SentencePieceTokenizer", "model": data["spm_a"]})
    prefix = str(tmp_path / "megatron_text_document")  # no record: accepted, whatever the model
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document(np.arange(10))
    check_dataset_tokenizer(prefix, {"type": "sentencepiece", "model": data["spm_b"]})
    open(sidecar_path(prefix), "w").write("{not json")
    with pytest.raises(DatasetTokenizerError, match="unreadable tokenizer record"):
        check_dataset_tokenizer(prefix, {"type": "byte", "model": None})


def test_training_datasets_refuse_another_tokenizer(data):
    from megaloop.config import load_config
    from megaloop.training.data import build_split_datasets

    cfg = load_config(None, [f"data.data_path=[{data['sp']}]", "data.seq_len=16", "model.max_seq_len=16",
                             f"data.cache_dir={data['root'] / 'cache'}"])
    with pytest.raises(ConfigError, match="was tokenized with sentencepiece") as err:
        build_split_datasets(cfg, 8, 0)
    assert data["sp"] in str(err.value) and "\n" not in str(err.value)
    ok = load_config(None, [f"data.data_path=[{data['byte']}]", "data.seq_len=16", "model.max_seq_len=16",
                            f"data.cache_dir={data['root'] / 'cache'}"])
    assert build_split_datasets(ok, 8, 0)["train"] is not None


@pytest.fixture(scope="module")
def sp_model(data):
    """A tiny megaloop model trained with spm_a (vocabulary 300): a checkpoint and its export."""
    from megaloop.export import export_hf
    from megaloop.checkpoint import save_plain_checkpoint
    from export_support import perturbed_model, tiny_config

    cfg = tiny_config("plain", ["model.vocab_size=300", "data.tokenizer_type=sentencepiece",
                                f"data.tokenizer_model={data['spm_a']}"])
    model = perturbed_model(cfg)
    ckpt = save_plain_checkpoint(model, cfg, data["root"] / "sp_run" / "model.pt")
    hf = export_hf(model.state_dict(), cfg, cfg.data, data["root"] / "sp_hf", verify=False)
    byte_cfg = tiny_config("plain")
    byte_ckpt = save_plain_checkpoint(perturbed_model(byte_cfg), byte_cfg, data["root"] / "byte_run" / "model.pt")
    return {"ckpt": ckpt, "hf": hf, "byte_ckpt": byte_ckpt}


def _eval(model, dataset, out, capsys):
    from tools.eval_loops import main

    rc = main(["--model", str(model), "--data", dataset, "--split", "90,10,0", "--seq-len", "16",
               "--max-windows", "2", "--loops", "1", "--exits", "--out-dir", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]  # transformers' bar
    return rc, "\n".join(lines)


@pytest.mark.parametrize("which", ["ckpt", "hf"])
def test_eval_loops_refuses_a_dataset_of_another_tokenizer(data, sp_model, tmp_path, capsys, which):
    """Byte ids all lie inside the sentencepiece model's vocabulary: only the record can tell."""
    rc, err = _eval(sp_model[which], data["byte"], tmp_path / "res", capsys)
    assert rc == 2 and err.count("\n") == 0, err
    assert data["byte"] in err and "another tokenizer type" in err, err
    assert not (tmp_path / "res").exists()
    rc, err = _eval(sp_model[which], data["sp"], tmp_path / "ok", capsys)  # its own tokenizer: evaluated
    assert rc == 0 and (tmp_path / "ok" / "eval_loops.csv").is_file(), err


def test_eval_loops_checks_token_ids_of_a_dataset_without_record(data, sp_model, tmp_path, capsys):
    """A Megatron-made dataset (no record) with ids past the model's vocabulary: one line, not an
    IndexError or a perplexity computed on the padded embedding rows."""
    prefix = str(tmp_path / "megatron_text_document")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in range(100):
            w.add_document((np.arange(40) * 7 + d) % 300)
    rc, err = _eval(sp_model["byte_ckpt"], prefix, tmp_path / "res", capsys)
    assert rc == 2 and err.count("\n") == 0, err
    assert prefix in err and "token ids up to 29" in err and "258 ids" in err, err
