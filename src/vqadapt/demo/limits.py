"""What the demo accepts from a visitor: file size, pixels, question length (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vqadapt.errors import VQAConfigError, VQADataError

MB = 2**20


@dataclass(frozen=True)
class UploadLimits:
    """What the demo accepts from a visitor (checked before an image is decoded)."""

    max_file_mb: float = 10.0
    """Largest image file, in MB of 2**20 bytes (as Gradio counts its upload limit)."""
    max_pixels: int = 25_000_000
    """Largest image, width x height (25 MP, e.g. 5000 x 5000)."""
    max_question_chars: int = 300
    """Longest question, in characters."""

    def __post_init__(self) -> None:
        if self.max_file_mb <= 0 or self.max_pixels <= 0 or self.max_question_chars <= 0:
            raise VQAConfigError(f"upload limits must be positive: {self}")


def check_upload(image: str | Path, limits: UploadLimits) -> None:
    """Refuse a file that is too big, too many pixels or not an image, with a message that says so.

    Only the image header is read (PIL opens lazily), so a decompression bomb is refused
    before it is decoded.
    """
    from PIL import Image

    path = Path(image)
    if not path.is_file():
        raise VQADataError("image file not found", file=path.name)
    size_mb = path.stat().st_size / MB
    if size_mb > limits.max_file_mb:
        raise VQADataError(
            f"the image file is {size_mb:.1f} MB; this demo accepts at most "
            f"{limits.max_file_mb:g} MB (vqadapt demo --max_file_mb)"
        )
    try:
        with Image.open(path) as opened:
            width, height = opened.size
    except Image.DecompressionBombError:
        width = height = None
    except (OSError, SyntaxError, ValueError) as err:
        raise VQADataError(f"not a readable image: {err}") from None
    if width is None or height is None or width * height > limits.max_pixels:
        found = f"{width} x {height} pixels" if width else "larger than PIL's bomb limit"
        raise VQADataError(
            f"the image is {found}; this demo accepts at most {limits.max_pixels:,} pixels "
            f"(width x height; vqadapt demo --max_pixels)"
        )


def check_question(question: str, limits: UploadLimits) -> str:
    """The question, NFC-normalised and stripped; refused when empty or too long."""
    from vqadapt.text import nfc

    question = nfc(question or "").strip()
    if not question:
        raise VQADataError("type a question first")
    if len(question) > limits.max_question_chars:
        raise VQADataError(
            f"the question has {len(question)} characters; this demo accepts at most "
            f"{limits.max_question_chars} (vqadapt demo --max_question_chars)"
        )
    return question
