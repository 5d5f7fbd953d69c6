"""Cleaning: Unicode normalization, control characters out, short and noisy documents dropped;
and the cleaned documents of a run of input files, which every pass over the input reads."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from hvdllm.data.sources import Document, ReadStats, read_documents

# C0/C1 control characters except tab and newline (carriage returns become newlines first).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def normalize(text: str) -> str:
    """NFC, Unix newlines, no NULs or other control characters."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


def noise_fraction(text: str) -> float:
    """Share of characters that are replacement characters or not printable (newline and tab
    count as printable)."""
    if not text:
        return 1.0
    if "\ufffd" not in text and text.replace("\n", "").replace("\t", "").isprintable():
        return 0.0  # the common case, without a Python loop over characters
    bad = sum(1 for ch in text if ch == "\ufffd" or (not ch.isprintable() and ch not in "\n\t"))
    return bad / len(text)


def clean_reason(text: str, min_chars: int, max_noise: float) -> str | None:
    """Why a normalized document is dropped ("short" or "noisy"), or None to keep it."""
    if len(text.strip()) < min_chars:
        return "short"
    if noise_fraction(text) > max_noise:
        return "noisy"
    return None


def cleaned_documents(files: Iterable[tuple[int, Path]], text_field: str, strict: bool, min_chars: int,
                      max_noise: float, read: ReadStats, dropped: Counter) -> Iterator[Document]:
    """The documents of these (global index, path) files, normalized, without the short and
    noisy ones (counted in ``dropped``); the same documents in the same order on every pass."""
    for index, path in files:
        for doc in read_documents(index, path, text_field, strict, read):
            if doc.prompt_chars:
                prompt = normalize(doc.text[:doc.prompt_chars])
                doc.text, doc.prompt_chars = prompt + normalize(doc.text[doc.prompt_chars:]), len(prompt)
            else:
                doc.text = normalize(doc.text)
            reason = clean_reason(doc.text, min_chars, max_noise)
            if reason:
                dropped[f"dropped_{reason}"] += 1
            else:
                yield doc
