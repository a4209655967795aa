"""Tokenizers: one small interface over sentencepiece, Hugging Face tokenizer.json files and tiktoken
files (megaloop/data/tokenizer_hf.py), plus a byte-level tokenizer that needs no model file.

Every tokenizer exposes encode / decode / vocab_size / eod_id / pad_id, and encode_batch, which the
preprocessing workers use because each library encodes a list of strings in one native call.
Every stage builds its tokenizer here (build_tokenizer): preprocessing, training, the end-of-run
sample, generate / eval_loops, the Hugging Face export.
"""
import os
from typing import Iterable, List, Optional, Sequence

import numpy as np

from megaloop.data.indexed_dataset import DataError


class TokenizerError(DataError):
    """A tokenizer that cannot be built: unknown type, missing or unreadable model file."""


class Tokenizer:
    """The interface the rest of megaloop relies on."""

    vocab_size: int
    eod_id: int  # appended after every document (--append-eod); separates documents in a packed sample
    pad_id: int

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then eod (256) and pad (257). Lossless and needs no model file."""

    def __init__(self):
        self.vocab_size = 258
        self.eod_id = 256
        self.pad_id = 257

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        # numpy views of the bytes: much faster than Python int lists for the preprocessing workers.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)  # special ids have no text
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A trained sentencepiece model (see tools/train_tokenizer.py).

    The end-of-document id is the model's eos piece, or a piece named "<eod>" when the model has no
    eos. The pad id is the model's pad piece, or "<pad>", else the eod id (padding is always masked
    out of the loss, so reusing eod is harmless).
    """

    def __init__(self, model_path: str, num_threads: int = 1):
        import sentencepiece

        self.model_path = model_path
        # One thread per process by default: the preprocessing CLI gets its parallelism from --workers.
        self.num_threads = num_threads
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as e:
            why = " ".join(str(e).split()) or type(e).__name__
            if not os.path.isfile(model_path):
                why = f"no such file (from {os.getcwd()})"
            raise TokenizerError(f"cannot load sentencepiece model {model_path!r}: {why}; check data.tokenizer_model "
                                 f"/ --tokenizer-model") from e
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = self._find_special(self.sp.eos_id(), "<eod>")
        if self.eod_id is None:
            raise TokenizerError(f"sentencepiece model {model_path!r} has neither an eos piece nor an '<eod>' piece; "
                             f"retrain it with tools/train_tokenizer.py, which adds both eod and pad")
        pad = self._find_special(self.sp.pad_id(), "<pad>")
        self.pad_id = self.eod_id if pad is None else pad

    def _find_special(self, builtin_id: int, piece: str) -> Optional[int]:
        if builtin_id >= 0:
            return builtin_id
        piece_id = self.sp.piece_to_id(piece)
        # piece_to_id answers unk_id for a piece it does not know.
        if piece_id != self.sp.unk_id() and self.sp.id_to_piece(piece_id) == piece:
            return piece_id
        return None

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts), out_type=int, num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        # Ids past the model's pieces (a model vocabulary padded beyond the tokenizer's) have no text.
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def __getstate__(self):
        # The C++ processor does not pickle; workers reload the model file.
        return {"model_path": self.model_path, "num_threads": self.num_threads}

    def __setstate__(self, state):
        self.__init__(state["model_path"], state["num_threads"])


# Megatron-LM and GPT-NeoX spell the tokenizer types differently; accept the spellings users know.
_TOKENIZER_ALIASES = {
    "byte": "byte",
    "bytetokenizer": "byte",
    "bytelevel": "byte",
    "sentencepiece": "sentencepiece",
    "sentencepiecetokenizer": "sentencepiece",
    "gptsentencepiecetokenizer": "sentencepiece",
    "llama2tokenizer": "sentencepiece",
    "spm": "sentencepiece",
    "hf": "hf",
    "huggingface": "hf",
    "huggingfacetokenizer": "hf",
    "tokenizerjson": "hf",
    "tiktoken": "tiktoken",
    "tiktokenizer": "tiktoken",
}
TOKENIZER_TYPES = ("byte", "sentencepiece", "hf", "tiktoken")


def normalize_tokenizer_type(kind) -> Optional[str]:
    """megaloop's name of a tokenizer type (Megatron-LM / GPT-NeoX spellings accepted), None if unknown."""
    return _TOKENIZER_ALIASES.get(str(kind).lower().replace("-", "").replace("_", ""))


def build_tokenizer(kind: str, model_path: Optional[str] = None, num_threads: int = 1,
                    eod_token: Optional[str] = None) -> Tokenizer:
    """Factory: kind is "byte", "sentencepiece", "hf" (a tokenizer.json or a folder holding one) or "tiktoken"
    (a local .tiktoken file); Megatron's names (SentencePieceTokenizer, HuggingFaceTokenizer) work too.
    eod_token names the end-of-document token of an hf / tiktoken tokenizer (see tokenizer_hf.py)."""
    normalized = normalize_tokenizer_type(kind)
    if normalized is None:
        raise TokenizerError(f"unknown tokenizer type {kind!r}; use one of {', '.join(TOKENIZER_TYPES)} "
                             f"(Megatron's HuggingFaceTokenizer / SentencePieceTokenizer work too)")
    if normalized == "byte":
        if model_path:
            raise TokenizerError("the byte tokenizer takes no model file; drop --tokenizer-model")
        return ByteTokenizer()
    if not model_path:
        what = {"hf": "a tokenizer.json or a model folder holding one", "tiktoken": "a .tiktoken file"}
        raise TokenizerError(f"tokenizer type {kind!r} needs {what.get(normalized, 'a model file')} "
                             f"(--tokenizer-model / data.tokenizer_model)")
    if eod_token and normalized == "sentencepiece":
        raise TokenizerError("--tokenizer-eod / data.tokenizer_eod applies to hf and tiktoken tokenizers; a "
                             "sentencepiece model names its own eos piece")
    if normalized == "hf":
        from megaloop.data.tokenizer_hf import HFTokenizer

        return HFTokenizer(model_path, eod_token=eod_token)
    if normalized == "tiktoken":
        from megaloop.data.tokenizer_hf import TiktokenTokenizer

        return TiktokenTokenizer(model_path, eod_token=eod_token)
    return SentencePieceTokenizer(model_path, num_threads=num_threads)


def resolve_tokenizer_model(path: Optional[str], anchors: Iterable = (), override: Optional[str] = None,
                            field: str = "data.tokenizer_model") -> Optional[str]:
    """The tokenizer model file to use: `override` (--tokenizer-model) when given, else `path` (what a run's
    config recorded) as it stands, else a relative `path` found under one of `anchors` (a run / checkpoint
    folder) or their parent folders, where the run was likely started. TokenizerError (one line) when none
    exists. None stays None (the byte tokenizer)."""
    # A Hugging Face tokenizer may be a folder holding tokenizer.json.
    if override:
        if not os.path.exists(override):
            raise TokenizerError(f"--tokenizer-model {override}: no such file (from {os.getcwd()})")
        return override
    if not path or os.path.exists(path):
        return path
    tried = [os.getcwd()]
    if not os.path.isabs(path):
        for anchor in anchors:
            folder = os.path.abspath(os.fspath(anchor))
            if not os.path.isdir(folder):
                folder = os.path.dirname(folder)
            for _ in range(8):
                candidate = os.path.join(folder, path)
                if os.path.exists(candidate):
                    return candidate
                tried.append(folder)
                parent = os.path.dirname(folder)
                if parent == folder:
                    break
                folder = parent
    where = f"from {tried[0]}" + (f" nor under {tried[1]} and its parents" if len(tried) > 1 else "")
    raise TokenizerError(f"tokenizer model {path!r} ({field} of the run) is not found {where}: pass "
                         f"--tokenizer-model PATH")
