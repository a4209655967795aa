"""Issue 12, "one clear line instead of a traceback": every tool fails with exit code 2 and exactly one line
on stderr ("error: ...") naming the file or field, with the traceback only under --debug / MEGALOOP_DEBUG=1.

Each case runs the tool as a subprocess (python tools/X.py ...). Cases the trainer meets (blend weights, a
split, seq_len, vocabulary, YAML) run the same library call through megaloop.errors.run_cli. A full disk
and a read-only file system are simulated in the subprocess by an `open` that fails with ENOSPC / EROFS
under one folder (tests run as root, where chmod does not stop writes); /sys stands in for a folder that
refuses writes for real.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megaloop.data.indexed_dataset import IndexedDatasetWriter
from preloaded import run_python

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MEGALOOP_DEBUG", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def _args(argv):
    return ["-c", argv[1]] if argv[0] == "-c" else [str(TOOLS / f"{argv[0]}.py"), *map(str, argv[1:])]


def run(argv, cwd=None, **env):
    """argv: [tool name, args...] for tools/<name>.py, or ["-c", code]. Runs as `python tools/<name>.py ...` in a
    process forked from tests/preloaded.py's server (its imports done); test_fresh_interpreter_prints_one_line
    checks that a fresh interpreter adds no line of its own (import-time warnings)."""
    return run_python(_args(argv), cwd=str(cwd or ROOT), env=_env(**env), timeout=120)


def run_fresh(argv, cwd=None, **env):
    """run() in a new interpreter, as a user's shell starts it."""
    return subprocess.run([sys.executable, *_args(argv)], cwd=cwd or ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=120)


# An `open` that fails for files written under FAULT_DIR: ENOSPC once FAULT_BYTES bytes are written (a disk
# that fills up), or EROFS at once.
FAULT_PRELUDE = textwrap.dedent("""
    import builtins, errno, io, os, runpy, sys
    FAULT_DIR, FAULT = os.path.abspath(sys.argv[1]), sys.argv[2]
    _open = builtins.open

    class _Full(io.RawIOBase):
        def __init__(self, f):
            self.f, self.n = f, 0
        def writable(self):
            return True
        def write(self, b):
            self.n += len(b)
            if self.n > 512:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)
        def fileno(self):
            return self.f.fileno()
        def flush(self):
            if not self.f.closed:
                self.f.flush()
        def close(self):
            super().close()
            self.f.close()

    def fault_open(file, mode="r", *args, **kwargs):
        path = os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
        if path.startswith(FAULT_DIR + os.sep) and any(c in mode for c in "wax+"):
            if FAULT == "rofs":
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
            f = _open(file, mode.replace("b", "") + "b", buffering=0)
            return io.BufferedWriter(_Full(f)) if "b" in mode else io.TextIOWrapper(io.BufferedWriter(_Full(f)))
        return _open(file, mode, *args, **kwargs)

    builtins.open = fault_open
    tool, sys.argv = sys.argv[3], sys.argv[3:]
    runpy.run_path(tool, run_name="__main__")
""")


def run_with_fault(fault_dir, fault, tool, *args):
    return run_python(["-c", FAULT_PRELUDE, str(fault_dir), fault, str(TOOLS / f"{tool}.py"), *map(str, args)],
                      cwd=str(ROOT), env=_env(), timeout=120)


def one_line(proc, *must):
    """Exit code 2, exactly one non-blank line on stderr, 'error: ...', containing every `must`."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for m in must:
        assert str(m) in lines[0], (m, lines[0])
    return lines[0]


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    ds = str(root / "corpus_text_document")
    with IndexedDatasetWriter(ds, np.uint16) as w:
        for d in range(40):
            w.add_document((np.arange(30) + d) % 250)
    big = str(root / "bigids_text_document")
    with IndexedDatasetWriter(big, np.uint16) as w:
        w.add_document([5, 300, 7])
    (root / "trunc").mkdir()
    for name in ("d.bin", "d.idx"):
        (root / "trunc" / name).write_bytes((root / f"corpus_text_document{name[1:]}").read_bytes())
    (root / "trunc" / "d.idx").write_bytes((root / "trunc" / "d.idx").read_bytes()[:-5])
    (root / "mismatch").mkdir()
    (root / "mismatch" / "d.idx").write_bytes((root / "corpus_text_document.idx").read_bytes())
    (root / "mismatch" / "d.bin").write_bytes((root / "corpus_text_document.bin").read_bytes() + b"\0\0")
    good = _jsonl(root / "good.jsonl", [{"text": f"document {i} with some text"} for i in range(20)])
    gz = root / "trunc.jsonl.gz"
    gz.write_bytes(gzip.compress(good.read_bytes() * 50)[:-40])
    _jsonl(root / "bad.jsonl", [{"txt": "a"}, {"txt": "b"}, "{not json", {"text": 3}])
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (root / "trunc.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(good.read_bytes() * 50)[:-40])
    pq.write_table(pa.table({"body": ["a", "b"]}), root / "body.parquet")
    (root / "empty.parquet").write_bytes(b"")
    pq.write_table(pa.table({"text": ["x" * 50] * 200}), root / "corrupt.parquet", compression="snappy")
    corrupt = bytearray((root / "corrupt.parquet").read_bytes())
    corrupt[40:140] = bytes(100)  # inside the column chunk: the footer still reads
    (root / "corrupt.parquet").write_bytes(bytes(corrupt))
    (root / "empty.jsonl").write_text("")
    (root / "bad.yaml").write_text("model:\n  vocab_size: [1, 2\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    return {"root": root, "ds": ds, "big": big, "good": str(good), "gz": str(gz)}


@pytest.fixture(scope="module")
def models(files):
    """A plain byte checkpoint, a sentencepiece one whose config records a relative tokenizer path
    (tok/spm.model, relative to `root`, where 'training ran'), and an export with a corrupted safetensors."""
    import sentencepiece

    from export_support import perturbed_model, tiny_config
    from megaloop.checkpoint import save_plain_checkpoint
    from megaloop.export import export_hf

    root = files["root"]
    (root / "tok").mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([f"alpha beta gamma {i} delta {i * 7}" for i in range(200)]),
        model_prefix=str(root / "tok" / "spm"), vocab_size=64, model_type="bpe", eos_id=2, pad_id=3,
        byte_fallback=False, minloglevel=2, num_threads=1)
    byte_cfg = tiny_config("plain")
    byte_model = perturbed_model(byte_cfg)
    byte_ckpt = save_plain_checkpoint(byte_model, byte_cfg, root / "byte_run" / "model.pt")
    sp_cfg = tiny_config("plain", ["model.vocab_size=64", "data.tokenizer_type=sentencepiece",
                                   "data.tokenizer_model=tok/spm.model"])
    sp_ckpt = save_plain_checkpoint(perturbed_model(sp_cfg), sp_cfg, root / "runs" / "sp" / "model.pt")
    hf = export_hf(byte_model.state_dict(), byte_cfg, byte_cfg.data, root / "hf_bad", verify=False)
    st = Path(hf) / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    return {"byte": str(byte_ckpt), "sp": str(sp_ckpt), "hf_bad": str(hf)}


def _build(call):
    return ("import sys\nfrom megaloop.errors import run_cli\nfrom megaloop.data import build_datasets\n"
            "from megaloop.data.tokenizer import ByteTokenizer\n"
            f"sys.exit(run_cli(lambda argv: {call}))")


def _load_yaml(path):
    return ("import sys\nfrom megaloop.errors import run_cli\nfrom megaloop.config import load_config\n"
            f"sys.exit(run_cli(lambda argv: load_config({str(path)!r})))")


PLAN_CFG = ROOT / "yaml_configs" / "tiny" / "lt.yaml"


def _world_check(expected):
    """What every rank does at start-up (megaloop.parallel.topology.build_parallel_state), here on one process."""
    return ("import sys\nfrom megaloop.errors import run_cli\nfrom megaloop.config import load_config\n"
            "from megaloop.parallel.topology import build_parallel_state\n"
            f"cfg = load_config({str(PLAN_CFG)!r}, ['parallel.expected_world_size={expected}'])\n"
            "sys.exit(run_cli(lambda argv: build_parallel_state(cfg.parallel)))")


# (id, argv builder, strings the line must hold)
CASES = [
    ("truncated-idx", lambda f: ["merge_datasets", "--datasets", f["root"] / "trunc" / "d", "--output-prefix",
                                 f["root"] / "o1"], lambda f: ["d.idx", "truncated", "preprocess_data"]),
    ("mismatched-bin-idx", lambda f: ["merge_datasets", "--datasets", f["root"] / "mismatch" / "d",
                                      "--output-prefix", f["root"] / "o2"], lambda f: ["d.bin", "do not belong"]),
    ("missing-prefix", lambda f: ["merge_datasets", "--datasets", f["root"] / "corpus", "--output-prefix",
                                  f["root"] / "o3"], lambda f: ["corpus.idx", "did you mean", f["ds"]]),
    ("bad-blend-weights", lambda f: ["-c", _build(f"build_datasets(['-1', {f['ds']!r}, '2', {f['ds']!r}], "
                                                  f"'90,10,0', 8, {{'train': 4}}, 1, cache_dir=None)")],
     lambda f: ["blend weights", "data.data_path", "[-1.0, 2.0]"]),
    ("weight-not-a-number", lambda f: ["-c", _build(f"build_datasets(['x', {f['ds']!r}], '90,10,0', 8, "
                                                    f"{{'train': 4}}, 1)")], lambda f: ["data.data_path", "'x'"]),
    ("bad-split", lambda f: ["-c", _build(f"build_datasets([{f['ds']!r}], '90,ten', 8, {{'train': 4}}, 1)")],
     lambda f: ["split '90,ten'", "data.split", "969,30,1"]),
    ("seq-len-longer-than-data", lambda f: ["-c", _build(f"build_datasets([{f['ds']!r}], '100,0,0', 5000, "
                                                         f"{{'train': 4}}, 1)")],
     lambda f: [f["ds"], "data.seq_len", "5001"]),
    ("ids-beyond-vocabulary", lambda f: ["-c", _build(f"build_datasets([{f['big']!r}], '100,0,0', 2, "
                                                      f"{{'train': 1}}, 1, tokenizer=ByteTokenizer())")],
     lambda f: [f["big"], "token id 300", "258 ids"]),
    ("yaml-syntax", lambda f: ["-c", _load_yaml(f["root"] / "bad.yaml")], lambda f: ["bad.yaml", "YAML"]),
    ("yaml-not-a-mapping", lambda f: ["-c", _load_yaml(f["root"] / "list.yaml")],
     lambda f: ["list.yaml", "must be a mapping"]),
    ("truncated-gz", lambda f: ["preprocess_data", "--input", f["gz"], "--output-prefix", f["root"] / "gzout",
                                "--tokenizer-type", "byte", "--quiet"], lambda f: [f["gz"], "truncated"]),
    ("truncated-zst", lambda f: ["preprocess_data", "--input", f["root"] / "trunc.jsonl.zst", "--output-prefix",
                                 f["root"] / "zstout", "--tokenizer-type", "byte", "--quiet"],
     lambda f: ["trunc.jsonl.zst", "truncated or corrupt zstandard"]),
    ("parquet-unknown-column", lambda f: ["preprocess_data", "--input", f["root"] / "body.parquet",
                                          "--output-prefix", f["root"] / "pqout", "--tokenizer-type", "byte"],
     lambda f: ["body.parquet", "no column 'text'", "--json-keys", "body"]),
    ("parquet-empty", lambda f: ["preprocess_data", "--input", f["root"] / "empty.parquet", "--output-prefix",
                                 f["root"] / "pqout", "--tokenizer-type", "byte"],
     lambda f: ["empty.parquet", "empty file (0 bytes)"]),
    ("parquet-corrupt", lambda f: ["preprocess_data", "--input", f["root"] / "corrupt.parquet", "--output-prefix",
                                   f["root"] / "pqout", "--tokenizer-type", "byte", "--workers", "2", "--quiet"],
     lambda f: ["corrupt.parquet", "corrupt or not a parquet file", "row group 0"]),
    ("all-records-skipped", lambda f: ["preprocess_data", "--input", f["root"] / "bad.jsonl", "--output-prefix",
                                       f["root"] / "badout", "--tokenizer-type", "byte", "--quiet"],
     lambda f: ["no valid document", "missing key 'text'", "bad.jsonl:1", "malformed json", "--json-keys"]),
    ("missing-input", lambda f: ["preprocess_data", "--input", f["root"] / "nope*.jsonl", "--output-prefix",
                                 f["root"] / "x", "--tokenizer-type", "byte", "--quiet"],
     lambda f: ["nope*.jsonl", "matches no file"]),
    ("output-not-writable", lambda f: ["preprocess_data", "--input", f["good"], "--output-prefix",
                                       "/sys/megaloop_no_such/out", "--tokenizer-type", "byte", "--quiet"],
     lambda f: ["/sys/megaloop_no_such", "nothing was written"]),
    ("eval-loops-empty-range", lambda f: ["eval_loops", "--model", "nowhere", "--text", "x", "--loops", "3-1"],
     lambda f: ["--loops '3-1'", "1-3"]),
    ("eval-loops-zero", lambda f: ["eval_loops", "--model", "nowhere", "--text", "x", "--loops", "0"],
     lambda f: ["--loops '0'", "at least 1"]),
    ("train-tokenizer-empty", lambda f: ["train_tokenizer", "--input", f["root"] / "empty.jsonl", "--model-prefix",
                                         f["root"] / "spm_empty", "--vocab-size", "100"],
     lambda f: ["no training text", "empty.jsonl", "empty"]),
    ("train-tokenizer-all-skipped", lambda f: ["train_tokenizer", "--input", f["root"] / "bad.jsonl",
                                               "--model-prefix", f["root"] / "spm_bad", "--vocab-size", "100"],
     lambda f: ["no training text", "missing key 'text'", "bad.jsonl:1"]),
    ("train-tokenizer-truncated-gz", lambda f: ["train_tokenizer", "--input", f["gz"], "--model-prefix",
                                                f["root"] / "spm_gz", "--vocab-size", "40", "--no-byte-fallback"],
     lambda f: [f["gz"], "truncated"]),
    ("merge-missing-folder", lambda f: ["merge_datasets", "--input", f["root"] / "nofolder", "--output-prefix",
                                        f["root"] / "o4"], lambda f: ["nofolder", "no such folder"]),
    # issue 21: numbers that ran on silently (or without end) before
    ("generate-negative-temperature", lambda f: ["generate", "--model", "nowhere", "--temperature", "-1"],
     lambda f: ["--temperature -1", ">= 0"]),
    ("generate-nan-temperature", lambda f: ["generate", "--model", "nowhere", "--temperature", "nan"],
     lambda f: ["--temperature nan", "finite"]),
    ("generate-loops-bound", lambda f: ["generate", "--model", "nowhere", "--loops", "1000000000"],
     lambda f: ["--loops 1000000000", "--max-loops 256"]),
    ("eval-loops-bound", lambda f: ["eval_loops", "--model", "nowhere", "--text", "x", "--loops", "1000000"],
     lambda f: ["--loops 1000000", "--max-loops 256"]),
    ("plan-loops-bound", lambda f: ["plan", "--config", PLAN_CFG, "loop.mean=1e9", "loop.max=1000000000"],
     lambda f: ["loop.mean=1e+09", "--max-loops 256"]),
    ("plan-negative-peak", lambda f: ["plan", "--config", PLAN_CFG, "--gpu", "X:-1e15:80:8e12"],
     lambda f: ["--gpu 'X:-1e15:80:8e12'", "peak_flops"]),
    ("plan-zero-memory", lambda f: ["plan", "--config", PLAN_CFG, "--gpu", "X:1e15:0:8e12"],
     lambda f: ["mem_gib", "positive"]),
    ("plan-negative-tokens", lambda f: ["plan", "--config", PLAN_CFG, "--tokens", "-1"],
     lambda f: ["--tokens -1", "positive"]),
    ("expected-world-size", lambda f: ["-c", _world_check(8)],
     lambda f: ["parallel.expected_world_size=8", "1 rank(s)", "--hostfile"]),
]


@pytest.mark.parametrize("name, argv, must", CASES, ids=[c[0] for c in CASES])
def test_one_line(files, name, argv, must):
    one_line(run(argv(files)), *must(files))


@pytest.mark.parametrize("name", ["missing-input", "generate-negative-temperature", "plan-negative-tokens",
                                  "merge-missing-folder"])
def test_fresh_interpreter_prints_one_line(files, name):
    """A few cases in a new interpreter, as a user starts the tool: its imports print nothing on stderr."""
    argv, must = dict((c[0], c[1:]) for c in CASES)[name]
    one_line(run_fresh(argv(files)), *must(files))


def test_no_partial_output_left(files):
    """The failed preprocess runs above leave nothing under their output names."""
    root = files["root"]
    for case in ("truncated-gz", "all-records-skipped", "truncated-zst", "parquet-corrupt"):
        proc = run(dict((c[0], c[1]) for c in CASES)[case](files))
        assert proc.returncode == 2
    assert not [p.name for p in root.iterdir() if p.name.startswith(("gzout", "badout", "spm_", "o1", "o2", "o3",
                                                                     "zstout", "pqout"))]


@pytest.mark.parametrize("fault, must", [("full", ["no space left on device", "free space"]),
                                         ("rofs", ["read-only file system", "writable folder"])])
def test_preprocess_disk_full_and_read_only(files, tmp_path, fault, must):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep_text_document.bin").write_bytes(b"old")  # an earlier dataset under another name stays
    proc = run_with_fault(out, fault, "preprocess_data", "--input", files["good"], files["good"], "--output-prefix",
                          out / "new", "--tokenizer-type", "byte", "--quiet", "--chunk-bytes", "256")
    line = one_line(proc, str(out), "nothing was written", *must)
    assert "/new_text_document" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep_text_document.bin"]  # no temporaries


def test_consolidate_disk_full_keeps_previous_file(models, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "model.pt").write_bytes(b"previous")
    proc = run_with_fault(out, "full", "consolidate", models["byte"], out / "model.pt")
    one_line(proc, "no space left on device", str(out), "previous file there is untouched")
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"] and (out / "model.pt").read_bytes() == b"previous"


def test_export_read_only_leaves_nothing(models, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    proc = run_with_fault(out, "rofs", "export_hf", "--checkpoint", models["byte"], "--output", out / "hf",
                          "--no-verify")
    one_line(proc, "read-only file system", str(out), f"nothing was written to {out / 'hf'}")
    assert list(out.iterdir()) == []  # no temporary folder left


def test_consolidate_without_arguments_is_argparse_usage():
    proc = run(["consolidate"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: the following arguments are required: checkpoint" in proc.stderr


def test_generate_corrupted_safetensors(models):
    one_line(run(["generate", "--model", models["hf_bad"], "--max-new-tokens", "2"]),
             "model.safetensors", "corrupted or truncated", "re-export")


def test_relative_tokenizer_path(models, files, tmp_path):
    """The run recorded tok/spm.model relative to where it was started: from another folder it is found
    under the run folder's parents; a run moved away from it fails in one line pointing at --tokenizer-model,
    which then fixes it."""
    proc = run(["generate", "--model", models["sp"], "--max-new-tokens", "2", "--prompt", "alpha"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = tmp_path / "moved" / "model.pt"
    moved.parent.mkdir()
    moved.write_bytes(Path(models["sp"]).read_bytes())
    one_line(run(["eval_loops", "--model", moved, "--text", files["good"], "--seq-len", "8"], cwd=tmp_path),
             "'tok/spm.model'", "data.tokenizer_model", "--tokenizer-model")


def test_eval_loops_seq_len_above_the_model(models, files):
    """--seq-len 1000 on a max_seq_len 64 model evaluated 64-token windows without a word; now refused."""
    one_line(run(["eval_loops", "--model", models["byte"], "--text", files["good"], "--seq-len", "1000"]),
             "--seq-len 1000", "at most 64 tokens", "model.max_seq_len")


def test_debug_shows_the_traceback(files):
    argv = CASES[0][1](files)
    for proc in (run(argv, MEGALOOP_DEBUG="1"), run(argv + ["--debug"])):
        assert proc.returncode == 2 and "Traceback" in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_only_rank_zero_reports(files):
    argv = CASES[0][1](files)
    proc = run(argv, RANK="1")
    assert proc.returncode == 2 and proc.stderr.strip() == "", proc.stderr
    proc = run(argv, RANK="3", MEGALOOP_DEBUG="1")
    assert proc.returncode == 2 and "error: [rank 3] " in proc.stderr


def test_run_cli_in_process(capsys, monkeypatch):
    """KeyboardInterrupt -> 130; a bug keeps its traceback; main's own return code passes through."""
    from megaloop.errors import run_cli

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("MEGALOOP_DEBUG", raising=False)

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_cli(interrupted, []) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda argv: 1 / 0, [])
    assert run_cli(lambda argv: 3, []) == 3 and run_cli(lambda argv: None, ["--debug"]) == 0
    seen = []
    run_cli(seen.append, ["a", "--debug", "b"])
    assert seen == [["a", "b"]]


def test_checkpoint_save_disk_full_names_the_intact_checkpoint(tmp_path):
    """save_training on a full disk: DeepSpeed's torch.save turns ENOSPC into a RuntimeError; the error is
    one line naming the folder, and says the previous complete checkpoint is intact."""
    import errno

    from megaloop.checkpoint import engine, layout
    from megaloop.errors import OutputError, one_line as line_of

    root = tmp_path / "checkpoints"
    prev = root / layout.tag_for(100)
    prev.mkdir(parents=True)
    layout.write_marker(prev, 100, 800)

    class FullDisk:
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            (root / tag).mkdir()
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    with pytest.raises(OutputError) as info:
        engine.save_training(FullDisk(), root, 200, {"consumed_samples": 1600}, rank=0)
    text = line_of(info.value)
    assert info.value.errno == errno.ENOSPC and "\n" not in text
    assert text.startswith(f"no space left on device: {root}") and str(prev) in text and "intact" in text, text
    assert layout.resolve(root) == prev  # `latest` / newest complete tag unchanged


# ---- issue 21 item 6: tracebacks that became one line (in-process: run_cli as every entry point runs it) ----

def _line(capsys, main):
    from megaloop.errors import run_cli
    code = run_cli(main, [])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def rank0(monkeypatch):
    for k in ("RANK", "MEGALOOP_DEBUG"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("override, must", [
    ("data.data_path=[A", ["override 'data.data_path=[A'", "not valid YAML", "[a, b]"]),
    ("model.d_model={a:", ["override 'model.d_model={a:'", "not valid YAML"]),
    ("model.d_model=!!python/object/apply:os.system [ls]", ["python/object/apply:os.system", "not valid YAML"]),
], ids=["unclosed-list", "unclosed-mapping", "yaml-tag"])
def test_malformed_override_value(capsys, rank0, override, must):
    from megaloop.config import load_config
    line = _line(capsys, lambda argv: load_config(None, [override]))
    for m in must:
        assert m in line, line


def test_override_resume_config_refuses_a_model_the_weights_do_not_fit(capsys, rank0):
    from megaloop.config import load_config
    from megaloop.training.resume_policy import check_resume_config
    saved = load_config(None, ["model.d_model=64", "model.n_heads=4"])
    wider = load_config(None, ["model.d_model=96", "model.n_heads=4"])
    line = _line(capsys, lambda argv: check_resume_config(saved, wider, "run/step_00000002", override=True))
    assert "--override-resume-config cannot change model.d_model: 64 in the checkpoint, 96 now" in line, line
    # a model field the weights still fit (the loop count) stays accepted
    more_loops = load_config(None, ["model.d_model=64", "model.n_heads=4", f"model.loops={saved.model.loops + 2}"])
    assert any("accepted by --override-resume-config" in x
               for x in check_resume_config(saved, more_loops, "run", override=True))


def test_truncated_rng_file_on_resume(capsys, rank0, tmp_path):
    import torch
    from megaloop.checkpoint import engine
    tag = tmp_path / "step_00000004"
    tag.mkdir()
    rng = tag / "rng_rank00000.pt"
    torch.save(engine.rng_state(), rng)
    rng.write_bytes(rng.read_bytes()[:200])

    class Engine:
        def load_checkpoint(self, root, tag, **kw):
            return str(tmp_path / tag), {"step": 4}

    line = _line(capsys, lambda argv: engine.load_training(Engine(), tag, rank=0))
    assert str(rng) in line and "truncated" in line, line  # (safe_load names it before DeepSpeed loads, or load_rng)


def test_tensorboard_full_disk_is_one_line_without_the_thread_traceback(capsys, rank0, tmp_path, monkeypatch):
    """TensorBoard's writer thread hits ENOSPC: no 'Exception in thread' traceback, one line naming the folder."""
    import errno
    import threading
    import time

    import tensorboard.summary.writer.record_writer as rw
    from megaloop.training.run_logging import RunLogger

    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    writes = []
    real_write = rw.RecordWriter.write

    def write(self, data):
        writes.append(1)
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(rw.RecordWriter, "write", write)

    def main(argv):
        logger = RunLogger(str(tmp_path / "run"), True)  # (train.loggers: tensorboard and jsonl by default)
        try:
            for step in range(200):
                logger.scalars(step, {"loss": 1.0})
                time.sleep(0.02)
        finally:
            logger.close()

    line = _line(capsys, main)
    assert line.startswith(f"error: no space left on device: {tmp_path / 'run' / 'tensorboard'}"), line
    assert thread_errors == [] and threading.excepthook == thread_errors.append  # (restored)


def test_master_port_in_use_is_refused_at_start():
    import socket

    from megaloop.training.distributed import DistributedSetupError, check_master_port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        with pytest.raises(DistributedSetupError, match=f"MASTER_PORT {port} is already in use.*--master_port"):
            check_master_port({"RANK": "0", "MASTER_PORT": port})
        check_master_port({"RANK": "1", "MASTER_PORT": port})  # (only rank 0 opens the store)
        check_master_port({"RANK": "0", "MASTER_PORT": port, "TORCHELASTIC_USE_AGENT_STORE": "True"})
    check_master_port({"RANK": "0", "MASTER_PORT": port})  # free again


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_stale_temporaries_of_a_killed_run_are_removed(files, tmp_path):
    """preprocess_data / export_hf killed mid-write leave '<name>.tmp-<host>-<pid>-...'; the next writer of the same
    name removes those whose process is gone, and leaves a live process's and another host's alone."""
    from megaloop.export.output_dir import make_temp_dir
    from megaloop.tempfiles import temp_suffix
    dead, host = _dead_pid(), temp_suffix().split("-")[1]
    out = tmp_path / "out"
    out.mkdir()
    stale = [f"new_text_document.bin.tmp-{host}-{dead}-7f00", f"new_text_document.idx.tmp-{dead}-7f00",
             f"new_text_document.tokenizer.json.tmp-{host}-{dead}"]
    kept = [f"new_text_document.bin.tmp-{host}-{os.getpid()}-1", f"new_text_document.bin.tmp-otherhost-{dead}-1",
            f"other_text_document.bin.tmp-{host}-{dead}-1"]
    for name in stale + kept:
        (out / name).write_bytes(b"partial")
    proc = run(["preprocess_data", "--input", files["good"], "--output-prefix", out / "new", "--tokenizer-type",
                "byte", "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert not names & set(stale) and set(kept) <= names, names
    (out / f".hf.tmp-{host}-{dead}-abc").mkdir()
    (out / f".hf.tmp-{host}-{dead}-abc" / "model.safetensors").write_bytes(b"partial")
    tmp = make_temp_dir(out / "hf")
    assert not (out / f".hf.tmp-{host}-{dead}-abc").exists() and tmp.is_dir()


def test_rendezvous_that_never_completes_is_one_line(tmp_path):
    """Rank 0 of a world of 2 whose rank 1 never starts: after train.dist_timeout, one line naming MASTER_ADDR:PORT
    (was DistStoreError's traceback)."""
    from test_train_support import free_port
    port = free_port()
    proc = run_python([ROOT / "pretrain_looped.py", "train.dist_timeout=2", f"train.output_dir={tmp_path / 'run'}"],
                      cwd=str(ROOT), timeout=300, env=_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0",
                                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
    one_line(proc, "rank 0 of 2 could not join", f"127.0.0.1:{port}", "train.dist_timeout=2 s", "MASTER_PORT")
