"""Hugging Face `tokenizer.json` tokenizers (Llama 3, Qwen, Ouro, GPT-2, tools/train_tokenizer.py --type bpe)
through the `tokenizers` library, and tiktoken BPE files, behind megaloop's Tokenizer interface.

HFTokenizer reads a `tokenizer.json`, or a folder holding one (a Hugging Face model folder, an
import_hf run folder, a megaloop export). Ids are exactly what `AutoTokenizer.from_pretrained(folder)(text)
.input_ids` gives (and what Megatron-LM's `--tokenizer-type HuggingFaceTokenizer` writes): the file's
post-processor runs, so a tokenizer that adds a BOS token (Llama 3) adds it to every document. The
vocabulary size counts the added tokens (`len(AutoTokenizer)`). The end-of-document id is, in order:
the token named by `eod_token` (--tokenizer-eod / data.tokenizer_eod); the folder's
tokenizer_config.json `eos_token`; a token named <|endoftext|>, <|end_of_text|>, </s> or <eos>; else
the tokenizer is refused with one line asking for --tokenizer-eod.

TiktokenTokenizer reads a local `.tiktoken` file (base64 token + rank per line, as OpenAI's and Llama 3's
original `tokenizer.model`): nothing is downloaded. Text is split with cl100k's pattern (Llama 3 uses
the same one); the end-of-document token (`<|endoftext|>`, or `eod_token`) takes the id after the last rank.
"""
from __future__ import annotations

import base64
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from megaloop.data.piece_cache import FastEncoder
from megaloop.data.tokenizer import Tokenizer, TokenizerError

EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
# tiktoken's cl100k_base split pattern (Llama 3's tokenizer splits text with the same expression).
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def find_tokenizer_json(path) -> str:
    """The tokenizer.json of `path`: the file itself, or the one inside a folder. One-line TokenizerError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise TokenizerError(f"{path} holds no tokenizer.json: point --tokenizer-model / data.tokenizer_model at "
                                 f"a Hugging Face tokenizer.json or the model folder that has one")
        return candidate
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer {path!r}: no such file or folder (from {os.getcwd()}); check "
                             f"--tokenizer-model / data.tokenizer_model")
    return path


def read_tokenizer_config(folder) -> Dict[str, Any]:
    """The folder's tokenizer_config.json as a dict ({} when absent or unreadable: it only names tokens)."""
    try:
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            cfg = json.load(f)
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, ValueError):
        return {}


def token_name(value) -> Optional[str]:
    """A tokenizer_config.json token entry: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (see the module doc)."""

    def __init__(self, path, eod_token: Optional[str] = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = os.fspath(path)
        self.eod_token = eod_token
        self.json_path = find_tokenizer_json(self.path)
        try:
            self.tok = RustTokenizer.from_file(self.json_path)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            why = " ".join(str(e).split())[:200] or type(e).__name__
            raise TokenizerError(f"cannot read Hugging Face tokenizer {self.json_path}: {why}; check "
                                 f"--tokenizer-model / data.tokenizer_model") from None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"Hugging Face tokenizer {self.json_path} has an empty vocabulary")
        self.vocab_size = max(vocab.values()) + 1
        config = read_tokenizer_config(os.path.dirname(self.json_path))
        self.eod_id = self._eod_id(config)
        pad = token_name(config.get("pad_token"))
        pad_id = self.tok.token_to_id(pad) if pad else None
        self.pad_id = self.eod_id if pad_id is None else pad_id  # padding is masked out of the loss anyway
        self._fast = None  # FastEncoder, False where the tokenizer's pipeline is not one it knows

    def _eod_id(self, config: Dict[str, Any]) -> int:
        if self.eod_token:
            found = self.tok.token_to_id(self.eod_token)
            if found is None:
                raise TokenizerError(f"--tokenizer-eod / data.tokenizer_eod {self.eod_token!r} is not a token of "
                                     f"{self.json_path}")
            return found
        eos = token_name(config.get("eos_token"))
        if eos is not None and self.tok.token_to_id(eos) is not None:
            return self.tok.token_to_id(eos)
        for name in EOD_NAMES:
            if self.tok.token_to_id(name) is not None:
                return self.tok.token_to_id(name)
        raise TokenizerError(f"{self.json_path}: cannot tell the end-of-document token (no tokenizer_config.json "
                             f"eos_token beside it, no token named {', '.join(EOD_NAMES)}): name it with "
                             f"--tokenizer-eod TOKEN (data.tokenizer_eod in a config)")

    @property
    def eod_name(self) -> str:
        return self.tok.id_to_token(self.eod_id)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=True).ids

    def _fast_encoder(self) -> Optional[FastEncoder]:
        if self._fast is None:  # built on first use: preprocessing workers need it, not every user
            self._fast = FastEncoder.build(self.tok) or False
        return self._fast or None

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if self._fast_encoder():
            return self._fast.encode_batch(texts)
        # One call into Rust for the whole batch; the _fast form skips the character offsets we never read.
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=True)]

    def encode_batch_flat(self, texts: Sequence[str]):
        """(all ids as one int64 array, ids per document) for a byte-level BPE tokenizer: the same ids as
        encode_batch, about 4x cheaper (piece_cache.py); None for other tokenizers."""
        return self._fast.encode_batch_flat(texts) if self._fast_encoder() else None

    def decode(self, ids: Sequence[int]) -> str:
        # Ids past the tokenizer's (a model vocabulary padded beyond it) have no text; specials are not shown.
        return self.tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=True)

    def __getstate__(self):
        return {"path": self.path, "eod_token": self.eod_token}

    def __setstate__(self, state):
        self.__init__(state["path"], state["eod_token"])


def read_tiktoken_ranks(path: str) -> Dict[bytes, int]:
    """A .tiktoken file: one `base64(token) rank` per line (tiktoken.load's format, read without its cache)."""
    if not os.path.isfile(path):
        raise TokenizerError(f"tiktoken file {path!r}: no such file (from {os.getcwd()}); check --tokenizer-model / "
                             f"data.tokenizer_model")
    ranks = {}
    try:
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read tiktoken file {path} (line {line_no}: expected 'base64-token rank'): "
                             f"{e}") from None
    if not ranks:
        raise TokenizerError(f"tiktoken file {path} holds no tokens")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """A local .tiktoken BPE file (see the module doc)."""

    def __init__(self, path, eod_token: Optional[str] = None):
        import tiktoken

        self.path = os.fspath(path)
        self.eod_token = eod_token
        ranks = read_tiktoken_ranks(self.path)
        self.eod_id = max(ranks.values()) + 1
        self.pad_id = self.eod_id
        self.vocab_size = self.eod_id + 1
        self.pattern = CL100K_PATTERN
        self.specials = {eod_token or "<|endoftext|>": self.eod_id}
        self.enc = tiktoken.Encoding(os.path.basename(self.path), pat_str=self.pattern, mergeable_ranks=ranks,
                                     special_tokens=self.specials)

    @property
    def eod_name(self) -> str:
        return next(iter(self.specials))

    def encode(self, text: str) -> List[int]:
        return self.enc.encode_ordinary(text)  # special-token text in a document stays text

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=1)  # --workers gives the parallelism

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode([int(i) for i in ids if 0 <= int(i) < self.eod_id])

    def to_hf_tokenizer(self):
        """The same tokenizer as a `tokenizers.Tokenizer` (for the Hugging Face export's tokenizer.json)."""
        from transformers.integrations.tiktoken import TikTokenConverter

        return TikTokenConverter(vocab_file=self.path, pattern=self.pattern,
                                 extra_special_tokens=self.specials).converted()

    def __getstate__(self):
        return {"path": self.path, "eod_token": self.eod_token}

    def __setstate__(self, state):
        self.__init__(state["path"], state["eod_token"])


def train_bpe(documents, out_dir, vocab_size: int, eod_token: str = "<|endoftext|>", pad_token: str = "<|pad|>",
              extra_specials: Sequence[str] = (), split_digits: bool = False, show_progress: bool = False) -> int:
    """Train a byte-level BPE (GPT-2's scheme: every string encodable, no unknown token) on an iterator of
    documents and write out_dir/tokenizer.json + tokenizer_config.json, a folder that HFTokenizer,
    AutoTokenizer and Megatron-LM's HuggingFaceTokenizer load. Ids: eod 0, pad 1, extra_specials next, then
    the 256 bytes and the merges. Each file is written under a temporary name and renamed into place.
    Returns the vocabulary size reached (smaller than vocab_size when the text has fewer merges)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = RustTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [eod_token, pad_token] + [s for s in extra_specials if s not in (eod_token, pad_token)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    os.makedirs(out_dir, exist_ok=True)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod_token, "pad_token": pad_token,
              "clean_up_tokenization_spaces": False}
    tmp = os.path.join(out_dir, f".tokenizer.json.tmp-{os.getpid()}")
    tmp_cfg = os.path.join(out_dir, f".tokenizer_config.json.tmp-{os.getpid()}")
    try:
        tok.save(tmp)
        with open(tmp_cfg, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        os.replace(tmp, os.path.join(out_dir, "tokenizer.json"))
        os.replace(tmp_cfg, os.path.join(out_dir, "tokenizer_config.json"))
    finally:
        for path in (tmp, tmp_cfg):
            if os.path.exists(path):
                os.remove(path)
    return tok.get_vocab_size(with_added_tokens=True)
