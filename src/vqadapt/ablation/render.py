"""The report's blocks (headings, paragraphs, tables, bullets, images), rendered to Markdown and
to self-contained HTML from one list, so ``report.md`` and ``report.html`` always say the same
thing; and the number formats every section uses."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

from vqadapt.ablation.plots import _finite

# ---------------------------------------------------------------- blocks


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    note: bool = False
    """Rendered as a highlighted call-out."""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Image:
    path: str
    """Relative to the report."""
    caption: str


Block = Heading | Para | Table | Bullets | Image


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    """Render blocks as GitHub-flavoured Markdown."""
    out = []
    for block in blocks:
        match block:
            case Heading(text, level):
                out.append(f"{'#' * level} {text}")
            case Para(text, note):
                out.append(f"> **{text}**" if note else text)
            case Table(headers, rows):
                lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |"]
                lines.append("|" + "|".join("---" for _ in headers) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("\n".join(lines))
            case Bullets(items):
                out.append("\n".join(f"- {item}" for item in items))
            case Image(path, caption):
                out.append(f"![{caption}]({path})\n\n*{caption}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.6em 1em;
        font-weight: bold; }
figure { margin: 1.5em 0; } img { max-width: 100%; }
figcaption { font-style: italic; color: #555; }
"""


def render_html(blocks: list[Block], title: str, images: dict[str, bytes]) -> str:
    """Render blocks as one HTML page; ``images`` maps an image path to its PNG bytes."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for block in blocks:
        match block:
            case Heading(text, level):
                out.append(f"<h{level}>{html.escape(text)}</h{level}>")
            case Para(text, note):
                css = ' class="note"' if note else ""
                out.append(f"<p{css}>{html.escape(text)}</p>")
            case Table(headers, rows):
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
                body = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                    for row in rows
                )
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            case Bullets(items):
                out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
            case Image(path, caption):
                data = base64.b64encode(images[path]).decode("ascii")
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" '
                    f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}'
                    "</figcaption></figure>"
                )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- formatting


def fmt_num(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if _finite(value) else "–"


def fmt_pct(value: object, digits: int = 1) -> str:
    """A 0..1 fraction as a percentage."""
    return f"{100 * value:.{digits}f}" if _finite(value) else "–"


def fmt_p(value: object) -> str:
    if not _finite(value):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def fmt_mean_std(mean: object, std: object, scale: float = 1.0, decimals: int = 3) -> str:
    """``mean ± std`` (std left out when zero or unknown), both multiplied by ``scale``."""
    if not _finite(mean):
        return "–"
    text = f"{scale * mean:.{decimals}f}"
    if _finite(std) and std > 0:
        text += f" ± {scale * std:.{decimals}f}"
    return text
