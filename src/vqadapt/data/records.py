"""The one record type every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

QUESTION_TYPES: dict[int, str] = {0: "object", 1: "number", 2: "colour", 3: "location"}
"""ViVQA / COCO-QA type codes."""


@dataclass(frozen=True)
class VQARecord:
    """One question about one image.

    ``answers`` holds one or more reference answers (NFC-normalised text, as in the file);
    ``image`` is the image reference as written in the source (an id such as ``"68857"``
    or a relative file name), resolved against an image root by ``data.images.ImageIndex``;
    ``qtype`` is a type name such as ``"colour"`` (or ``None`` when the format has none).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    image: str | None
    qtype: str | None = None

    @property
    def answer(self) -> str:
        """The first (training target) answer."""
        return self.answers[0]
