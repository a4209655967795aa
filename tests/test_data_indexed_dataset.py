"""The .bin/.idx writer and reader: exact Megatron-LM bytes, round trips, validation errors."""
import os
import struct

import numpy as np
import pytest

from megaloop.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    dtype_code,
    token_dtype_for_vocab,
)


def write_megatron_reference(prefix, docs, dtype, code):
    """An independent writer following the format description byte for byte (not our writer)."""
    lengths = [len(d) for d in docs]
    itemsize = np.dtype(dtype).itemsize
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(np.array(d, dtype=dtype).tobytes())
    pointers, total = [], 0
    for n in lengths:
        pointers.append(total)
        total += n * itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(docs)))
        f.write(struct.pack("<Q", len(docs) + 1))
        f.write(struct.pack(f"<{len(docs)}i", *lengths))
        f.write(struct.pack(f"<{len(docs)}q", *pointers))
        f.write(struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1)))


DOCS = [[5, 6, 7], [1], [], [65000, 2, 3, 4]]


def test_writer_bytes_match_the_format_exactly(tmp_path):
    ours, ref = str(tmp_path / "ours"), str(tmp_path / "ref")
    with IndexedDatasetWriter(ours, np.uint16) as writer:
        for doc in DOCS:
            writer.add_document(doc)
    write_megatron_reference(ref, DOCS, np.uint16, 8)
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(ref + ext, "rb").read()

    idx = open(ours + ".idx", "rb").read()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", idx[9:17]) == (1,)
    assert idx[17] == 8  # uint16
    assert struct.unpack("<QQ", idx[18:34]) == (4, 5)
    assert struct.unpack("<4i", idx[34:50]) == (3, 1, 0, 4)
    assert struct.unpack("<4q", idx[50:82]) == (0, 6, 8, 8)
    assert struct.unpack("<5q", idx[82:122]) == (0, 1, 2, 3, 4)
    assert len(idx) == 122


def test_reader_reads_reference_files(tmp_path):
    prefix = str(tmp_path / "ref")
    write_megatron_reference(prefix, DOCS, np.int32, 4)
    ds = IndexedDataset(prefix)
    assert len(ds) == 4 and ds.num_documents == 4 and ds.dtype == np.int32
    for i, doc in enumerate(DOCS):
        assert ds.get(i).tolist() == doc
    assert ds.get(3, offset=1, length=2).tolist() == [2, 3]
    assert ds.get(0, offset=1).tolist() == [6, 7]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=5)
    with pytest.raises(IndexError):
        ds.get(4)


def test_multi_sequence_documents_and_modes(tmp_path):
    prefix = str(tmp_path / "sent")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 3, 4, 5], sequence_lengths=[2, 3])
        writer.add_document([9], sequence_lengths=[1])
    ds = IndexedDataset(prefix)
    assert len(ds) == 3 and ds.num_documents == 2
    assert ds.doc_idx.tolist() == [0, 2, 3]
    assert ds.get_document(0).tolist() == [1, 2, 3, 4, 5]
    assert ds.sequence_modes is None
    # Multimodal files append int8 modes, unflagged in the header: found from the file size.
    with open(prefix + ".idx", "ab") as f:
        f.write(np.array([0, 1, 0], dtype=np.int8).tobytes())
    assert IndexedDataset(prefix).sequence_modes.tolist() == [0, 1, 0]


def test_add_documents_fast_path_and_merge(tmp_path):
    a, b, merged = (str(tmp_path / n) for n in ("a", "b", "merged"))
    with IndexedDatasetWriter(a, np.uint16) as writer:
        writer.add_documents(np.array([1, 2, 3, 4, 5, 6]), [2, 4])
    with IndexedDatasetWriter(b, np.uint16) as writer:
        writer.add_document([7, 8, 9], sequence_lengths=[1, 2])
    with IndexedDatasetWriter(merged, np.int32) as writer:  # widening uint16 -> int32 is lossless
        writer.add_index(a)
        writer.add_index(b)
    ds = IndexedDataset(merged)
    assert [ds.get(i).tolist() for i in range(len(ds))] == [[1, 2], [3, 4, 5, 6], [7], [8, 9]]
    assert ds.doc_idx.tolist() == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="without losing"):
        with IndexedDatasetWriter(str(tmp_path / "narrow"), np.uint8) as writer:
            writer.add_index(merged)
    assert not any(p.name.startswith("narrow") for p in tmp_path.iterdir())


def test_writer_refuses_ids_that_do_not_fit_and_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="does not fit"):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document([1, 2])
            writer.add_document(np.array([70000], dtype=np.int32))
    assert list(tmp_path.iterdir()) == []


def test_unfinalized_writer_leaves_no_valid_looking_files(tmp_path):
    prefix = str(tmp_path / "partial")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_document([1, 2, 3])
    writer._bin.flush()
    # Simulated crash: nothing under the final names.
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda idx, bin_: idx.write_bytes(b"XXIDIDX\x00\x00" + idx.read_bytes()[9:]), "wrong magic"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:9] + struct.pack("<Q", 2) + idx.read_bytes()[17:]),
         "unsupported version 2"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:17] + bytes([7]) + idx.read_bytes()[18:]), "float"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:17] + bytes([42]) + idx.read_bytes()[18:]),
         "unknown dtype code 42"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-5]), "truncated"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:20]), "truncated"),
        (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes()[:-2]), "truncated"),
        (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes() + b"\x00\x00"), "do not belong together"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-8] + struct.pack("<q", 3)), "document indices"),
    ],
)
def test_reader_rejects_bad_files_naming_file_and_problem(tmp_path, corrupt, message):
    prefix = str(tmp_path / "d")
    write_megatron_reference(prefix, DOCS, np.uint16, 8)
    corrupt(tmp_path / "d.idx", tmp_path / "d.bin")
    with pytest.raises(IndexedDatasetError, match=message) as info:
        IndexedDataset(prefix)
    assert str(tmp_path / "d.") in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.idx"):
        IndexedDataset(str(tmp_path / "nothing"))


def test_dtype_rules():
    assert token_dtype_for_vocab(65499) == np.uint16
    assert token_dtype_for_vocab(65500) == np.int32
    assert dtype_code(np.uint16) == 8 and dtype_code(np.int32) == 4 and dtype_code(np.uint8) == 1
    with pytest.raises(ValueError):
        dtype_code(np.float32)


def test_pickle_passes_the_path_not_the_data(tmp_path):
    import pickle

    prefix = str(tmp_path / "d")
    write_megatron_reference(prefix, DOCS, np.uint16, 8)
    ds = IndexedDataset(prefix)
    blob = pickle.dumps(ds)
    assert len(blob) < 500
    assert pickle.loads(blob).get(3).tolist() == DOCS[3]


def test_merge_datasets_tool_keeps_document_boundaries(tmp_path):
    from tools.merge_datasets import main as merge_main

    (tmp_path / "shards").mkdir()
    write_megatron_reference(str(tmp_path / "shards" / "s0"), [[1, 2], [3]], np.uint16, 8)
    with IndexedDatasetWriter(str(tmp_path / "shards" / "s1"), np.uint16) as writer:
        writer.add_document([4, 5, 6], sequence_lengths=[1, 2])
    write_megatron_reference(str(tmp_path / "shards" / "s2"), [[70000]], np.int32, 4)
    assert merge_main(["--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "all")]) == 0
    ds = IndexedDataset(str(tmp_path / "all"))
    assert ds.dtype == np.int32
    assert [ds.get_document(d).tolist() for d in range(ds.num_documents)] == [[1, 2], [3], [4, 5, 6], [70000]]
    assert ds.doc_idx.tolist() == [0, 1, 2, 4, 5]
    assert merge_main(["--datasets", str(tmp_path / "shards" / "s0"), str(tmp_path / "missing"),
                       "--output-prefix", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x.bin").exists()


def test_dataset_fingerprint_sees_another_corpus_behind_the_same_prefix(tmp_path, monkeypatch):
    """What a checkpoint records of its data (megaloop.data.fingerprint): the same files give the same
    fingerprint; another corpus under the same prefix differs (also through the sampled hash of a large index)."""
    from megaloop.data import fingerprint as fp
    from megaloop.data.indexed_dataset import IndexedDatasetWriter

    prefix = str(tmp_path / "c_text_document")

    def write(docs):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for d in docs:
                w.add_document(d)
        return fp.dataset_fingerprint(prefix)

    a = write([[1, 2, 3], [4, 5]])
    assert fp.fingerprint_changes({prefix: a}, {prefix: write([[1, 2, 3], [4, 5]])}) == []
    changed = fp.fingerprint_changes({prefix: a}, {prefix: write([[1, 2], [3, 4, 5]])})  # same sizes and count
    assert len(changed) == 1 and "index_xxh64" in changed[0] and "documents" not in changed[0]
    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 128)  # (a 2 KiB index: hashed in three 64-byte pieces)
    monkeypatch.setattr(fp, "PIECE_BYTES", 64)
    b = write([[1, 2, 3], [4, 5]] * 50)
    assert fp.dataset_fingerprint(prefix) == b
    assert fp.fingerprint_changes({prefix: b}, {prefix: write([[4, 5], [1, 2, 3]] + [[1, 2, 3], [4, 5]] * 49)})
    # resume_policy: refused in one line naming the prefix, or accepted (one note) with --override-resume-config
    from megaloop.config import load_config
    from megaloop.training.resume_policy import ResumeConfigError, check_data_fingerprint

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "yaml_configs", "tiny", "lt.yaml"),
                      [f"data.data_path=[{prefix}]"])
    with pytest.raises(ResumeConfigError, match="--override-resume-config") as err:
        check_data_fingerprint({prefix: b}, cfg, "ckpt")
    assert prefix in str(err.value) and "\n" not in str(err.value)
    assert len(check_data_fingerprint({prefix: b}, cfg, "ckpt", override=True)) == 1
    assert check_data_fingerprint(None, cfg, "ckpt") == []  # a checkpoint from before fingerprints: not checked
