"""Find and open images: a one-time index of an image folder and a safe RGB loader.

References come from the annotation files: ViVQA uses MS-COCO ids (``"68857"``), EVJVQA
and JSONL files use file names relative to the image root (``"00000002007.jpg"``,
``"sub/x.png"``). Nothing outside the root is ever returned: ``..``, absolute paths and
symlinks that point outside the root are refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps

from vqadapt.data.records import VQARecord
from vqadapt.errors import VQADataError

ID_PATTERNS = (
    "COCO_train2014_{:012d}.jpg",
    "COCO_val2014_{:012d}.jpg",
    "{:012d}.jpg",
    "{}.jpg",
    "{}.png",
)
"""File names tried, in order, for a numeric image id."""

ESCAPES_ROOT = "reference escapes the image root"
SYMLINK_OUTSIDE = "symlink points outside the image root"
REFUSED_REASONS = (ESCAPES_ROOT, SYMLINK_OUTSIDE)
"""Reasons :meth:`ImageIndex.lookup` gives for references it refuses (never opened)."""


class ImageIndex:
    """All files under ``root``, scanned once, looked up by relative path or file name.

    A bare file name (no ``/``) also matches a file of that name in any subfolder (the first
    in sorted path order); symlinked folders are not followed.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "not found"
            raise VQADataError(f"image root {what}", file=self.root)
        self._real_root = self.root.resolve()
        self._by_relpath: dict[str, Path] = {}
        self._by_name: dict[str, Path] = {}
        self._outside: set[str] = set()
        self._scan()

    def _scan(self) -> None:
        stack = [(self.root, "")]
        found: list[tuple[str, Path]] = []
        while stack:
            folder, prefix = stack.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    relpath = f"{prefix}{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((Path(entry.path), f"{relpath}/"))
                    elif entry.is_symlink():
                        target = Path(entry.path).resolve()
                        if not target.is_relative_to(self._real_root):
                            self._outside.add(relpath)
                            self._outside.add(entry.name)
                        elif target.is_file():
                            found.append((relpath, Path(entry.path)))
                    elif entry.is_file():
                        found.append((relpath, Path(entry.path)))
        for relpath, path in sorted(found):
            self._by_relpath[relpath] = path
            self._by_name.setdefault(relpath.rsplit("/", 1)[-1], path)

    def __len__(self) -> int:
        return len(self._by_relpath)

    def _lookup(self, ref: str) -> tuple[Path | None, str]:
        """The path for ``ref`` or None with the reason."""
        ref = ref.strip().replace("\\", "/")
        if not ref:
            return None, "empty image reference"
        if ref.isascii() and ref.isdigit():
            number = int(ref)
            for pattern in ID_PATTERNS:
                for value in (number, ref) if "{}" in pattern else (number,):
                    path = self._by_name.get(pattern.format(value))
                    if path is not None:
                        return path, ""
            names = ", ".join(p.format(number) for p in ID_PATTERNS)
            return None, f"no image file for id {ref} (tried {names})"
        posix = PurePosixPath(ref)
        if posix.is_absolute() or ".." in posix.parts or (len(ref) > 1 and ref[1] == ":"):
            return None, ESCAPES_ROOT
        relpath = str(posix)
        if relpath in self._outside or (len(posix.parts) == 1 and posix.name in self._outside):
            return None, SYMLINK_OUTSIDE
        path = self._by_relpath.get(relpath)
        if path is None and len(posix.parts) == 1:
            path = self._by_name.get(relpath)
        return path, "" if path is not None else "image file not found"

    def lookup(self, ref: str) -> tuple[Path | None, str]:
        """(path, "") for an image found, else (None, the reason: missing or refused)."""
        return self._lookup(ref)

    def resolve(self, ref: str) -> Path | None:
        """Path of the image ``ref`` names, or None when missing or outside the root."""
        return self._lookup(ref)[0]

    def resolve_strict(self, ref: str, row: int | None = None) -> Path:
        """Like :meth:`resolve` but raise :class:`VQADataError` naming the reference."""
        path, reason = self._lookup(ref)
        if path is None:
            raise VQADataError(f"{reason}: {ref!r} under {self.root}", row=row, field="image")
        return path

    def coverage(self, records: Iterable[VQARecord]) -> tuple[int, list[str]]:
        """(number of distinct image references found, sorted distinct missing references).

        Records without an image are ignored.
        """
        refs = {r.image for r in records if r.image is not None}
        missing = sorted(ref for ref in refs if self.resolve(ref) is None)
        return len(refs) - len(missing), missing


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # PIL's direct conversion clips 16-bit values at 255; scale them to 8 bits instead.
        values = np.asarray(image).astype(np.int64)
        shift = 8 if values.max(initial=0) > 255 else 0
        grey = np.clip(values >> shift, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    ):
        # Transparent pixels become white, not whatever colour hides under alpha = 0.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def upright_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright (EXIF orientation applied) and in RGB: what every loaded image goes
    through."""
    return _to_rgb(ImageOps.exif_transpose(image) or image)


def load_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Open an image as RGB, upright (EXIF orientation applied), optionally resized to
    ``size`` x ``size`` (bicubic, aspect ratio not kept).

    PIL's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) stays on. Missing, empty,
    truncated, corrupt or non-image files raise :class:`VQADataError` naming the file.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise VQADataError("empty image file (0 bytes)", file=path)
        with Image.open(path) as opened:
            opened.load()
            image = upright_rgb(opened)
            if image is opened:
                image = opened.copy()
    except VQADataError:
        raise
    except FileNotFoundError:
        raise VQADataError("image file not found", file=path) from None
    except Image.DecompressionBombError as err:
        raise VQADataError(f"image too large: {err}", file=path) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise VQADataError(f"cannot read image: {err}", file=path) from None
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image
