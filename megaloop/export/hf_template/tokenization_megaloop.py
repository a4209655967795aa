"""Tokenizers of exported megaloop models, for AutoTokenizer (trust_remote_code=True).

Both reproduce megaloop's own tokenizers id for id (megaloop/data/tokenizer.py):
  MegaloopByteTokenizer           UTF-8 bytes 0..255, then <eod> (256) and <pad> (257); no model file.
  MegaloopSentencePieceTokenizer  a sentencepiece model (tokenizer.model): ids are exactly
                                  SentencePieceProcessor.encode(text); needs the `sentencepiece` package.
Neither adds a BOS token (megaloop never does); <eod> is the eos token, documents end with it.
Self-contained: imports only transformers (and sentencepiece, lazily).
"""
import os
import shutil
from typing import Dict, List, Optional, Tuple

try:
    from transformers import PreTrainedTokenizer
except ImportError:  # pragma: no cover
    from transformers.tokenization_utils import PreTrainedTokenizer


class MegaloopByteTokenizer(PreTrainedTokenizer):
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, eos_token="<eod>", pad_token="<pad>", **kwargs):
        self._specials = {"<eod>": 256, "<pad>": 257}
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(eos_token=eos_token, pad_token=pad_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return 258

    def get_vocab(self) -> Dict[str, int]:
        vocab = {f"<0x{i:02X}>": i for i in range(256)}
        vocab.update(self._specials)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return [f"<0x{b:02X}>" for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if token in self._specials:
            return self._specials[token]
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return int(token[3:5], 16)
        raise KeyError(f"{token!r} is not a byte token")

    def _convert_id_to_token(self, index: int) -> str:
        index = int(index)
        if 0 <= index < 256:
            return f"<0x{index:02X}>"
        for name, i in self._specials.items():
            if i == index:
                return name
        raise IndexError(f"id {index} is outside the byte vocabulary (258)")

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        data = bytes(int(t[3:5], 16) for t in tokens if len(t) == 6 and t.startswith("<0x"))
        return data.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str, ...]:
        return ()


class MegaloopSentencePieceTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, eos_token="<eod>", pad_token="<pad>", unk_token="<unk>", **kwargs):
        import sentencepiece

        self.vocab_file = vocab_file
        self.sp = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(eos_token=eos_token, pad_token=pad_token, unk_token=unk_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> Dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        ids = [self.sp.piece_to_id(t) for t in tokens]
        return self.sp.decode(ids)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp"] = None
        return state

    def __setstate__(self, state):
        import sentencepiece

        self.__dict__ = state
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.vocab_file)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str, ...]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        out = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)


__all__ = ["MegaloopByteTokenizer", "MegaloopSentencePieceTokenizer"]
