"""tools/preprocess_data.py and megaloop.data.preprocess: round trips, input kinds, bad-input reports."""
import gzip
import json
import os

import numpy as np
import pytest

from megaloop.data.indexed_dataset import DataError, IndexedDataset
from megaloop.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from tools.preprocess_data import main as preprocess_main

TEXTS = ["hello world", "second document\nwith two lines", "ünïcödé ✓", "x" * 5000, "last one"]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def byte_docs(prefix):
    ds = IndexedDataset(prefix)
    return [bytes(ds.get(i).tolist()) for i in range(len(ds))]


def test_round_trip_text_to_tokens_to_reader(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    summary = preprocess(PreprocessConfig(input_files=[str(tmp_path / "a.jsonl")],
                                          output_prefix=str(tmp_path / "out"), append_eod=True,
                                          chunk_bytes=64, show_progress=False))  # tiny units: many of them
    prefix = str(tmp_path / "out_text_document")
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and len(ds) == len(TEXTS) and ds.num_documents == len(TEXTS)
    for i, text in enumerate(TEXTS):
        tokens = ds.get(i).tolist()
        assert tokens[-1] == 256  # eod
        assert bytes(tokens[:-1]).decode("utf-8") == text
    assert summary.documents == len(TEXTS) and summary.total_skipped == 0
    assert summary.total_tokens == sum(len(t.encode()) + 1 for t in TEXTS)


def test_a_worker_dies_on_sigterm_whatever_handler_the_caller_installed():
    """Pool.terminate() ends workers with SIGTERM; a forked worker that kept the caller's Python handler (a
    trainer's stop flag, a test runner's) survived it and was joined forever (seen as a hung CI run)."""
    import signal

    from megaloop.data.preprocess import _init_worker
    before = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        _init_worker("byte", None, ["text"], True, np.uint16)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_workers_and_input_kinds_give_identical_output(tmp_path):
    """1 or 2 workers, plain or gzip, one file or a glob of two: the same bytes in input order."""
    records = [{"text": f"doc {i} " + "abc " * (i % 7), "meta": f"m{i}"} for i in range(200)]
    write_jsonl(tmp_path / "all.jsonl", records)
    write_jsonl(tmp_path / "part1.jsonl", records[:120])
    with gzip.open(tmp_path / "part2.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in records[120:]:
            f.write(json.dumps(r) + "\n")
    outputs = []
    for name, inputs, workers in [("one", ["all.jsonl"], 1), ("two", ["all.jsonl"], 2),
                                  ("glob", ["part*"], 2)]:
        code = preprocess_main(["--input", *[str(tmp_path / p) for p in inputs], "--jsonl-keys", "text", "meta",
                                "--output-prefix", str(tmp_path / name), "--tokenizer-type", "byte",
                                "--workers", str(workers), "--chunk-bytes", "500", "--quiet"])
        assert code == 0
        outputs.append([open(tmp_path / f"{name}_{key}_document{ext}", "rb").read()
                        for key in ("text", "meta") for ext in (".bin", ".idx")])
    assert outputs[0] == outputs[1] == outputs[2]
    assert byte_docs(str(tmp_path / "one_meta_document"))[7] == b"m7"


def test_text_inputs_by_line_and_by_file(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("gz line\n")
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz")]
    summary = preprocess(PreprocessConfig(inputs, str(tmp_path / "lines"), show_progress=False))
    assert byte_docs(str(tmp_path / "lines_text_document")) == [b"first line", b"second line", b"gz line"]
    assert summary.blank_lines == 1
    preprocess(PreprocessConfig(inputs, str(tmp_path / "files"), text_documents="file", show_progress=False))
    assert byte_docs(str(tmp_path / "files_text_document")) == [b"first line\n\nsecond line\n", b"gz line\n"]


def test_sentencepiece_preprocessing_matches_direct_encoding(tmp_path):
    from tools.train_tokenizer import main as train_main

    texts = [f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(300)]
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    train_main(["--input", str(tmp_path / "c.jsonl"), "--model-prefix", str(tmp_path / "spm"),
                "--vocab-size", "300", "--num-threads", "1"])
    model = str(tmp_path / "spm.model")
    preprocess(PreprocessConfig([str(tmp_path / "c.jsonl")], str(tmp_path / "sp"), tokenizer_type="sentencepiece",
                                tokenizer_model=model, append_eod=True, workers=2, chunk_bytes=1000,
                                show_progress=False))
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    ds = IndexedDataset(str(tmp_path / "sp_text_document"))
    assert [ds.get(i).tolist() for i in range(len(ds))] == [sp.encode(t) + [sp.eos_id()] for t in texts]


BAD_LINES = [
    (json.dumps({"text": "good one"}).encode(), None),
    (b'{"text": "broken', "malformed json"),
    (json.dumps({"body": "no text key"}).encode(), "missing key 'text'"),
    (json.dumps({"text": 42}).encode(), "key 'text' is not a string"),
    (b'{"text": "bad \xff byte"}', "invalid UTF-8"),
    (json.dumps({"text": "   "}).encode(), "empty document under key 'text'"),
    (json.dumps(["a", "list"]).encode(), "json value is not an object"),
    (json.dumps({"text": "good two"}).encode(), None),
]


def write_bad_file(path):
    with open(path, "wb") as f:
        for line, _ in BAD_LINES:
            f.write(line + b"\n")


def test_bad_records_are_counted_and_reported_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_bad_file(path)
    summary = preprocess(PreprocessConfig([str(path)], str(tmp_path / "out"), chunk_bytes=40,
                                          workers=2, show_progress=False))
    assert byte_docs(str(tmp_path / "out_text_document")) == [b"good one", b"good two"]
    expected = {category: line_no for line_no, (_, category) in enumerate(BAD_LINES, start=1) if category}
    assert dict(summary.skipped) == {category: 1 for category in expected}
    for category, line_no in expected.items():
        (example,) = summary.skipped_examples[category]
        assert (example.path, example.line) == (str(path), line_no)
    report = summary.report()
    assert "skipped 6 records" in report and f"{path}:2: malformed json" in report


@pytest.mark.parametrize("line_no", [i for i, (_, c) in enumerate(BAD_LINES, start=1) if c])
def test_strict_mode_turns_each_bad_record_into_an_error_and_writes_nothing(tmp_path, line_no):
    line, category = BAD_LINES[line_no - 1]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + line + b"\n")
    with pytest.raises(PreprocessError, match=f"{path}:2: {category}"):
        preprocess(PreprocessConfig([str(path)], str(tmp_path / "out"), strict=True, show_progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_failed_run_keeps_previous_output_and_leaves_no_temporaries(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"text": "keep me"}])
    assert preprocess_main(["--input", str(good), "--output-prefix", str(tmp_path / "out"),
                            "--tokenizer-type", "byte", "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = tmp_path / "bad.jsonl"
    write_bad_file(bad)
    assert preprocess_main(["--input", str(bad), "--output-prefix", str(tmp_path / "out"),
                            "--tokenizer-type", "byte", "--strict", "--quiet"]) == 2
    assert f"{bad}:2: malformed json" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "bad.jsonl"}
    assert after == before


def test_input_that_yields_nothing_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": ""}\n\n')
    with pytest.raises(PreprocessError, match="no valid document"):
        preprocess(PreprocessConfig([str(path)], str(tmp_path / "out"), show_progress=False))
    assert os.listdir(tmp_path) == ["empty.jsonl"]


def test_cli_reports_summary_and_rejects_unsupported_flags(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "abc"}, {"text": 1}])
    assert preprocess_main(["--input", str(tmp_path / "*.jsonl"), "--output-prefix", str(tmp_path / "o"),
                            "--tokenizer-type", "byte", "--append-eod", "--quiet", "--partitions", "2"]) == 0
    err = capsys.readouterr().err
    assert "1 documents, 4 tokens" in err and "1 x key 'text' is not a string" in err
    assert preprocess_main(["--input", str(tmp_path / "nothing*.jsonl"), "--output-prefix", "x",
                            "--tokenizer-type", "byte"]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert preprocess_main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", "x",
                            "--tokenizer-type", "byte", "--split-sentences"]) == 2
    assert preprocess_main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", "x",
                            "--tokenizer-type", "byte", "--vocab-size", "50000"]) == 2
    assert "does not match" in capsys.readouterr().err


def test_interrupted_run_leaves_no_file_that_looks_valid(tmp_path, monkeypatch):
    from megaloop.data import preprocess as preprocess_module

    write_jsonl(tmp_path / "a.jsonl", [{"text": f"document {i}"} for i in range(100)])
    calls = []
    original = preprocess_module.IndexedDatasetWriter.add_documents

    def interrupt_on_third_unit(self, tokens, lengths):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM turned into SystemExit by the CLI
        return original(self, tokens, lengths)

    monkeypatch.setattr(preprocess_module.IndexedDatasetWriter, "add_documents", interrupt_on_third_unit)
    with pytest.raises(KeyboardInterrupt):
        preprocess(PreprocessConfig([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), workers=2, chunk_bytes=100,
                                    show_progress=False))
    assert os.listdir(tmp_path) == ["a.jsonl"]


@pytest.fixture(scope="module")
def same_corpus_in_every_format(tmp_path_factory):
    """One corpus (with a second column) as jsonl, multi-frame .jsonl.zst, a folder of two parquet files of
    several row groups, and a Hugging Face datasets folder of two Arrow shards."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path_factory.mktemp("formats")
    records = [{"text": f"doc {i} " + "abc é " * (i % 7), "meta": f"m{i}"} for i in range(200)]
    write_jsonl(root / "a.jsonl", records)
    raw = (root / "a.jsonl").read_bytes()
    cut = raw.index(b"\n", 3000) + 1 - 7  # a frame boundary inside a line
    zstd = zstandard.ZstdCompressor()
    (root / "a.jsonl.zst").write_bytes(zstd.compress(raw[:cut]) + zstd.compress(raw[cut:]))
    (root / "shards").mkdir()
    (root / "shards" / "README.md").write_text("not an input")
    pq.write_table(pa.Table.from_pylist(records[:130]), root / "shards" / "part-0.parquet", row_group_size=30)
    pq.write_table(pa.Table.from_pylist(records[130:]), root / "shards" / "part-1.parquet", row_group_size=30)
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(records).save_to_disk(str(root / "hf"), num_shards=2)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:3]),
                          "test": datasets.Dataset.from_list(records[3:5])}).save_to_disk(str(root / "hf_dict"))
    return root


@pytest.mark.parametrize("source", ["a.jsonl.zst", "shards", "hf"])
def test_every_input_format_gives_the_jsonl_dataset_byte_for_byte(same_corpus_in_every_format, tmp_path, source):
    from megaloop.data.text_inputs import expand_inputs, iter_documents

    root = same_corpus_in_every_format
    outputs = []
    for name, inputs in (("ref", str(root / "a.jsonl")), ("fmt", str(root / source))):
        assert preprocess_main(["--input", inputs, "--json-keys", "text", "meta", "--output-prefix",
                                str(tmp_path / name), "--tokenizer-type", "byte", "--workers", "2",
                                "--chunk-bytes", "700", "--quiet"]) == 0
        outputs.append([(tmp_path / f"{name}_{key}_document{ext}").read_bytes()
                        for key in ("text", "meta") for ext in (".bin", ".idx")])
    assert outputs[0] == outputs[1]
    # tools/train_tokenizer.py reads the same documents
    paths = expand_inputs([str(root / source)])
    assert list(iter_documents(paths, ["text"])) == list(iter_documents([str(root / "a.jsonl")], ["text"]))


def test_table_bad_rows_are_reported_by_row_and_a_dataset_dict_is_refused(same_corpus_in_every_format, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megaloop.data.text_inputs import expand_inputs

    values = ["r0", "r1", "r2", "r3", "r4", None, "r6", "  ", "r8"]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": values}), path, row_group_size=4)  # rows 5 and 7 in the second group
    summary = preprocess(PreprocessConfig([str(path)], str(tmp_path / "out"), workers=2, show_progress=False))
    assert byte_docs(str(tmp_path / "out_text_document")) == [v.encode() for v in values if v and v.strip()]
    report = summary.report()
    assert f"{path} row 5: null value under key 'text'" in report
    assert f"{path} row 7: empty document under key 'text'" in report
    with pytest.raises(PreprocessError, match=r"t.parquet row 5: null value"):
        preprocess(PreprocessConfig([str(path)], str(tmp_path / "strict"), strict=True, show_progress=False))
    with pytest.raises(DataError, match="a DatasetDict with splits test, train; pass one split's folder"):
        expand_inputs([str(same_corpus_in_every_format / "hf_dict")])


def test_shuffle_seed_permutes_documents_of_every_key_alike(tmp_path, monkeypatch):
    from megaloop.data import shuffle_documents

    records = [{"text": f"document {i}", "meta": f"m{i}"} for i in range(50)]
    write_jsonl(tmp_path / "a.jsonl", records)

    def run(name, seed):
        return preprocess(PreprocessConfig([str(tmp_path / "a.jsonl")], str(tmp_path / name), json_keys=["text", "meta"],
                                           chunk_bytes=100, workers=2, show_progress=False, shuffle_seed=seed))

    summary = run("s", 3)
    order = np.random.RandomState(3).permutation(50)
    assert byte_docs(str(tmp_path / "s_text_document")) == [f"document {i}".encode() for i in order]
    assert byte_docs(str(tmp_path / "s_meta_document")) == [f"m{i}".encode() for i in order]
    assert "documents shuffled with seed 3" in summary.report()
    # small gather blocks (documents one by one) give the same bytes
    monkeypatch.setattr(shuffle_documents.write_shuffled, "__defaults__", (5,))
    run("t", 3)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"t_text_document{ext}").read_bytes() == (tmp_path / f"s_text_document{ext}").read_bytes()
    before = sorted(os.listdir(tmp_path))

    def interrupted(source, writer, order, block_tokens=0):
        raise KeyboardInterrupt

    monkeypatch.setattr(shuffle_documents, "write_shuffled", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("u", 3)
    assert sorted(os.listdir(tmp_path)) == before  # neither the first pass nor a partial output is left


def test_an_output_that_cannot_be_written_fails_before_any_worker_forks(tmp_path, monkeypatch):
    """The outputs open before the tokenizer pool starts: no pool to tear down on the error path (tearing down
    a pool whose workers were still starting hung once under load)."""
    import multiprocessing

    from megaloop.data.indexed_dataset import OutputError

    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    forked = []
    real = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda *a: forked.append(a) or real(*a))
    (tmp_path / "afile").write_text("x")  # the output folder's name taken by a file: it cannot be made
    with pytest.raises(OutputError, match="afile"):
        preprocess(PreprocessConfig([str(tmp_path / "a.jsonl")], str(tmp_path / "afile" / "sub" / "out"),
                                    show_progress=False))
    assert forked == []
    assert (tmp_path / "afile").read_text() == "x"
    preprocess(PreprocessConfig([str(tmp_path / "a.jsonl")], str(tmp_path / "ok"), show_progress=False))
    assert forked  # (the patched context is the one a good run uses)
