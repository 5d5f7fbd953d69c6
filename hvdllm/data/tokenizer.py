"""Tokenizers, all as a ``tokenizers.Tokenizer`` saved to ``tokenizer.json``:

- ``bpe``: byte-level BPE (as GPT-2) trained on the cleaned corpus with the tokenizers library;
- ``byte``: the 256 bytes themselves plus the special tokens; nothing to train;
- a path to an existing ``tokenizer.json`` (it must know ``<|endoftext|>``).

Byte-level means every string round-trips: decode(encode(text)) == text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hvdllm.errors import UserError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]


def _byte_level(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> Tokenizer:
    """Ids 0..255 are the bytes, then the special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; order the vocab by byte value.
    byte_chars = sorted(alphabet, key=lambda ch: _BYTE_OF_CHAR[ch])
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tok = _byte_level(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which ByteLevel uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_OF_CHAR = {ch: b for b, ch in _bytes_to_unicode().items()}


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"{path}: not a tokenizers JSON file: {err}") from None
    if tok.token_to_id(EOS) is None:
        raise UserError(f"{path}: tokenizer has no {EOS} token")
    return tok


def tokenizer_sha256(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two tokenizer.json texts are the same tokenizer: compared as tokenizers writes
    them, so a file re-saved by ``hvdllm prepare --tokenizer FILE`` (or re-indented) still
    matches. A text that is no tokenizer is a UserError."""
    if a == b:
        return True
    try:
        return Tokenizer.from_str(a).to_str() == Tokenizer.from_str(b).to_str()
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise UserError(f"not a tokenizers JSON text: {err}") from None


def eos_id(tok: Tokenizer) -> int:
    return tok.token_to_id(EOS)
