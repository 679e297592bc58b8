"""Text normalisation shared by loaders, metrics and answer weights.

Vietnamese text can arrive precomposed (NFC, ``"đỏ"`` as 2 code points) or decomposed
(NFD, base letters plus combining marks); the two look identical but compare unequal.
Everything that compares answers goes through :func:`normalize` first.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache


def nfc(text: str) -> str:
    """Return ``text`` in Unicode NFC (precomposed) form."""
    return unicodedata.normalize("NFC", text)


@lru_cache(maxsize=65536)
def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def normalize(text: str) -> str:
    """Canonical form for comparing answers.

    Unicode NFC, lowercase, every punctuation character (Unicode category ``P*``) replaced by
    a space, runs of whitespace collapsed to one space, ends stripped. Diacritics are kept:
    in Vietnamese they distinguish words (``"năm"`` five vs ``"nam"`` south).
    """
    # NFC again after lower(): lowercasing can produce sequences that compose differently.
    text = nfc(nfc(text).lower())
    text = "".join(" " if _is_punctuation(char) else char for char in text)
    return " ".join(text.split())
