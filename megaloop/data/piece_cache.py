"""A faster, byte-identical path for encoding many documents with a byte-level BPE tokenizer.json.

What a Hugging Face byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, tools/train_tokenizer.py --type bpe)
does to a document: split out added tokens; split the text with one regular expression into pieces
(words with their leading space, runs of digits, punctuation, whitespace); map each piece's UTF-8
bytes to characters (ByteLevel); run the BPE model on each piece on its own; add the post-processor's
special tokens (Llama 3's BOS). The ids are the concatenation of the pieces' ids, and a corpus holds
few distinct pieces (the demo corpus: 37,000 in 1.9 million), so this encoder splits the text with
Python's `re` (C, about 2x faster than the `tokenizers` pre-tokenizer with its per-byte offset
bookkeeping), looks each piece up in a dict, and runs the tokenizer's own BPE model only on pieces it
has not seen. The result is the tokenizer's own, not a re-implementation of BPE (tiktoken's BPE differs
from merge-list BPE on some words).

Exactness rests on the split, which is the only part done differently:
  * only tokenizer.json shapes it understands get this path (no normalizer, or NFC / NFKC for ASCII
    documents only; the ByteLevel pre-tokenizer, or Split(regex) + ByteLevel(use_regex=False); a model
    without dropout; a ByteLevel / TemplateProcessing / no post-processor); `FastEncoder.build` returns
    None for anything else and the caller keeps `encode_batch_fast`;
  * the pattern's \\p{L}, \\p{N}, \\s are spelled as explicit character classes for `re`, and every
    character is checked against the tokenizers pre-tokenizer (oniguruma) before a document holding it
    takes this path: a batch of probe strings puts each new character after and before letters, digits,
    punctuation, spaces and apostrophes, and the two splits must agree (a character that disagrees, say
    from a newer Unicode version on one side, sends its documents to the `tokenizers` path);
  * a document holding an added token's text (say a literal <|endoftext|>) takes the `tokenizers` path.
Memory: the piece dict is emptied when it reaches MAX_PIECES entries (a fixed bound per worker).
"""
from __future__ import annotations

import itertools
import json
import re
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

MAX_PIECES = 1 << 17  # ~35 MB per worker at most (measured: 65 MB at 265,000 pieces); refilled after a reset
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Unicode's White_Space property (oniguruma's \s); a character where the two engines disagree is caught
# by the probes and sent to the tokenizers path.
WHITESPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
              (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
_PROBE_CONTEXTS = ("a{}", "{}a", "1{}", "{}1", "!{}", "{}!", " {}", "{} ", " {}a", "'{}", "'{}e", "'{}l", "'r{}",
                   "'v{}", "'l{}", "{}{}", "\n{}", "{}\n", "{}  a", "a{}1!")


def _ranges(predicate) -> List[tuple]:
    out, start = [], None
    for cp in range(0x10001):
        inside = cp <= 0xFFFF and not 0xD800 <= cp <= 0xDFFF and predicate(chr(cp))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            out.append((start, cp - 1))
            start = None
    return out


def _class_body(ranges) -> str:
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


_CLASSES: Dict[str, str] = {}


def _classes() -> Dict[str, str]:
    # The Basic Multilingual Plane only: `re` tests a class's characters beyond it one range after another
    # on every miss (3x slower splitting); an astral letter or digit (𝐀, 𠀀) is refused by the probes.
    if not _CLASSES:
        _CLASSES["L"] = _class_body(_ranges(lambda c: unicodedata.category(c)[0] == "L"))
        _CLASSES["N"] = _class_body(_ranges(lambda c: unicodedata.category(c)[0] == "N"))
        _CLASSES["s"] = _class_body(WHITESPACE)
    return _CLASSES


def translate_pattern(pattern: str) -> Optional[str]:
    """An oniguruma split pattern as a Python `re` pattern, or None when it uses anything else than
    \\p{L}, \\p{N}, \\s, \\S (outside brackets) and plain escapes."""
    classes = _classes()
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1:i + 2]
            if pattern.startswith(("\\p{L}", "\\p{N}"), i):
                body = classes[pattern[i + 3]]
                out.append(body if in_class else f"[{body}]")
                i += 5
                continue
            if nxt == "s":
                out.append(classes["s"] if in_class else f"[{classes['s']}]")
            elif nxt == "S" and not in_class:
                out.append(f"[^{classes['s']}]")
            elif nxt in ("r", "n", "t", "f", "v") or (nxt and not nxt.isalnum() and nxt.isascii()):
                out.append(c + nxt)
            else:
                return None  # \d, \w, \p{Lu}, \b, ...: semantics that differ between the engines
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            if pattern.startswith("[^", i):
                out.append("[^")
                i += 2
                continue
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _split_pattern(spec: dict) -> Optional[str]:
    """The one regex a tokenizer.json's pre_tokenizer splits with (the shapes this path knows), or None."""
    if not spec:
        return None
    kind = spec.get("type")
    if kind == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space", False):
        return GPT2_PATTERN
    if kind == "Sequence" and len(spec.get("pretokenizers", [])) == 2:
        split, byte_level = spec["pretokenizers"]
        if (split.get("type") == "Split" and "Regex" in (split.get("pattern") or {})
                and split.get("behavior") == "Isolated" and not split.get("invert", False)
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space", False)):
            return split["pattern"]["Regex"]
    return None


def _special_ids(spec: Optional[dict]):
    """(prefix ids, suffix ids) the post-processor adds to one sequence, or None for an unknown one."""
    if spec is None or spec.get("type") == "ByteLevel":
        return [], []
    if spec.get("type") == "TemplateProcessing":
        prefix, suffix, seen_sequence = [], [], False
        for item in spec.get("single", []):
            if "Sequence" in item:
                seen_sequence = True
            elif "SpecialToken" in item:
                ids = spec["special_tokens"][item["SpecialToken"]["id"]]["ids"]
                (suffix if seen_sequence else prefix).extend(ids)
            else:
                return None
        return (prefix, suffix) if seen_sequence else None
    return None


class _Pieces(dict):
    """piece -> its number; the ids of piece i are flat[starts[i]:starts[i] + lengths[i]]. A piece not seen
    before gets the next number at once and its ids at commit(): the tokenizer's BPE model on each piece."""

    def __init__(self, model_only):
        super().__init__()
        self.model_only = model_only
        self.reset()

    def reset(self):
        self.clear()
        self.flat, self.starts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.lengths, self.chars = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.new = []

    def __missing__(self, piece):
        self.new.append(piece)
        number = self[piece] = len(self)
        return number

    def commit(self):
        """Run the BPE model on the pieces new since the last commit, all in one call."""
        if self.new:
            encoded = self.model_only.encode_batch_fast(self.new, add_special_tokens=False)
            lengths = np.fromiter((len(e.ids) for e in encoded), np.int64, len(encoded))
            ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encoded), np.int64, int(lengths.sum()))
            self.starts = np.concatenate([self.starts, self.flat.size + np.cumsum(lengths) - lengths])
            self.flat = np.concatenate([self.flat, ids])
            self.lengths = np.concatenate([self.lengths, lengths])
            self.chars = np.concatenate([self.chars, np.fromiter(map(len, self.new), np.int64, len(self.new))])
            self.new = []


class FastEncoder:
    """encode_batch for a byte-level BPE tokenizers.Tokenizer, byte-identical to encode_batch_fast."""

    @classmethod
    def build(cls, tok) -> Optional["FastEncoder"]:
        """The fast path for `tok` (a tokenizers.Tokenizer), or None when its pipeline is not one it knows."""
        from tokenizers import pre_tokenizers

        spec = json.loads(tok.to_str())
        normalizer = (spec.get("normalizer") or {}).get("type")
        pattern = _split_pattern(spec.get("pre_tokenizer"))
        specials = _special_ids(spec.get("post_processor"))
        if (normalizer not in (None, "NFC", "NFKC") or pattern is None or specials is None
                or (spec.get("model") or {}).get("dropout") or spec.get("truncation") or spec.get("padding")):
            return None
        translated = translate_pattern(pattern)
        if translated is None:
            return None
        model_only = type(tok).from_str(tok.to_str())
        model_only.normalizer = None
        model_only.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        model_only.post_processor = None
        return cls(tok, re.compile(translated), model_only, specials, ascii_only=normalizer is not None,
                   added=[t["content"] for t in spec.get("added_tokens", [])])

    def __init__(self, tok, split, model_only, specials, ascii_only: bool, added: Sequence[str]):
        self.tok, self.split, self.pieces = tok, split, _Pieces(model_only)
        self.prefix, self.suffix = specials
        self.ascii_only = ascii_only  # a normalizer that leaves ASCII text alone
        self.added = [a for a in added if a]
        self.added_starts = {a[:2] for a in self.added}  # Llama 3's 256 specials: one search for "<|"
        self.verified, self.refused = set(), set()
        self._verify(set(map(chr, range(128))))
        self.ascii_verified = len(self.verified) == 128  # else ASCII documents are checked character by character

    def _splits_agree(self, chars) -> bool:
        probe = "\n".join(context.format(c, c) for c in chars for context in _PROBE_CONTEXTS)
        try:
            theirs = [span for _, span in self.tok.pre_tokenizer.pre_tokenize_str(probe)]
        except Exception:  # a lone surrogate: tokenizers cannot take it at all
            return False
        return theirs == [m.span() for m in self.split.finditer(probe)]

    def _verify(self, chars) -> None:
        """Sort new characters into verified / refused by probing both splitters (bisecting a failing batch)."""
        chars = sorted(chars)
        if not chars:
            return
        if self._splits_agree(chars):
            self.verified.update(chars)
        elif len(chars) == 1:
            self.refused.update(chars)
        else:
            self._verify(chars[:len(chars) // 2])
            self._verify(chars[len(chars) // 2:])

    def _takes_fast_path(self, text: str) -> bool:
        if any(s in text for s in self.added_starts) and any(a in text for a in self.added):
            return False
        if text.isascii() and self.ascii_verified:
            return True
        if self.ascii_only and not text.isascii():
            return False
        if self.verified.issuperset(text):
            return True
        new = set(text) - self.verified
        if not new & self.refused:
            self._verify(new)
        return not new & self.refused

    def encode_batch_flat(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """All documents' ids concatenated (int64) and the ids per document, as tokenizers gives them."""
        texts = list(texts)
        fast = np.array([self._takes_fast_path(t) for t in texts], dtype=bool)
        if len(self.pieces) >= MAX_PIECES:  # between batches only: the numbers below must stay valid
            self.pieces.reset()
        number, split = self.pieces.__getitem__, self.split.findall
        split_texts = [split(t) for t in itertools.compress(texts, fast)]
        counts = np.fromiter(map(len, split_texts), np.int64, len(split_texts))
        numbers = np.fromiter(map(number, itertools.chain.from_iterable(split_texts)), np.int64, int(counts.sum()))
        del split_texts
        self.pieces.commit()
        lengths, ids = self._gather(numbers, counts, np.array([len(t) for t in itertools.compress(texts, fast)]))
        if not self.prefix and not self.suffix and lengths is not None and fast.all():
            return ids, lengths
        # Specials around each document, documents the tokenizers path takes: assembled one by one.
        docs = iter(np.split(ids, np.cumsum(lengths)[:-1]) if lengths is not None and lengths.size else ())
        slow = [t for t, f in zip(texts, fast) if not f]
        if lengths is None:  # the pattern left text between matches somewhere: all by the tokenizers path
            slow, fast[:] = texts, False
        slow_ids = iter(self.tok.encode_batch_fast(slow, add_special_tokens=True) if slow else ())
        prefix, suffix = np.array(self.prefix, np.int64), np.array(self.suffix, np.int64)
        parts = [np.concatenate([prefix, next(docs), suffix]) if f else np.array(next(slow_ids).ids, np.int64)
                 for f in fast]
        lengths = np.fromiter(map(len, parts), np.int64, len(parts))
        return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), lengths

    def _gather(self, numbers: np.ndarray, counts: np.ndarray, text_chars: np.ndarray):
        """(ids per document, all ids) for documents of counts[d] pieces, or (None, None) when the pieces
        do not cover a document's text."""
        piece_ends = np.cumsum(counts)
        chars = np.concatenate([[0], np.cumsum(self.pieces.chars[numbers])])
        if not np.array_equal(chars[piece_ends] - chars[piece_ends - counts], text_chars):
            return None, None
        lengths = self.pieces.lengths[numbers]
        total = np.concatenate([[0], np.cumsum(lengths)])
        doc_lengths = total[piece_ends] - total[piece_ends - counts]
        if lengths.size and (lengths == 1).all():  # most pieces are one token
            return doc_lengths, self.pieces.flat[self.pieces.starts[numbers]]
        # position k of the output is flat[starts[piece] + (k - first output position of that piece)]
        offsets = np.repeat(self.pieces.starts[numbers] - total[:-1], lengths)
        return doc_lengths, self.pieces.flat[offsets + np.arange(int(total[-1]))]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        ids, lengths = self.encode_batch_flat(texts)
        return [part.tolist() for part in np.split(ids, np.cumsum(lengths)[:-1])] if len(lengths) else []
