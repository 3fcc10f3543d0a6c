"""One self-contained HTML page: tables, embedded PNG figures, configs and protocols."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_prune.protocol import KEY_FIELDS

#: written into the head of every report; ``report --output`` replaces only files holding it
GENERATOR = '<meta name="generator" content="lightning-prune report">'

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em;
       margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left;
         overflow-wrap: anywhere; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { background: #fff6d6; border-left: 4px solid #e0b000; padding: 0.5em 0.8em; }
.muted { color: #777; }
"""


def image(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as base64."""
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """An HTML table of ``rows`` (floats with 2 decimals, right-aligned numbers)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if isinstance(value, float):
                cells.append(f'<td class="num">{value:,.2f}</td>')
            elif isinstance(value, int) and not isinstance(value, bool):
                cells.append(f'<td class="num">{value:,}</td>')
            else:
                cells.append(f"<td>{html.escape('' if value is None else str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def note(text: str) -> str:
    """A highlighted remark."""
    return f'<p class="note">{html.escape(text)}</p>'


def section(anchor: str, title: str, body: str) -> str:
    """One titled section with an ``id`` (also the table-of-contents anchor)."""
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def protocol_tables(records: dict[str, dict[str, Any]]) -> str:
    """Every record's protocol entries, seed, creation date and package versions."""
    parts = []
    for label, record in records.items():
        entries = record.get("protocol") or []
        columns = list(dict.fromkeys(k for entry in entries for k in entry))
        columns = [c for c in KEY_FIELDS if c in columns] + [
            c for c in columns if c not in KEY_FIELDS
        ]
        parts.append(f"<h3>{html.escape(label)}</h3>")
        parts.append(table(entries, columns))
        facts = {
            "created": record.get("created"),
            "seed": record.get("seed"),
            **{f"model.{k}": v for k, v in (record.get("model") or {}).items()},
            **{f"calibration.{k}": v for k, v in (record.get("calibration") or {}).items()},
            **{f"version.{k}": v for k, v in (record.get("versions") or {}).items()},
        }
        rows = [{"field": k, "value": v} for k, v in facts.items() if v not in (None, [], "")]
        parts.append(table(rows, ["field", "value"]))
    return "".join(parts)


def page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document: a table of contents and the ``(anchor, title, body)`` sections."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    toc = " · ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in sections)
    body = "".join(section(a, t, b) for a, t, b in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="muted">generated {stamp} by '
        f"lightning-prune report</p><nav>{toc}</nav>{body}</body></html>\n"
    )


def is_report(path: Path) -> bool:
    """Whether the file at ``path`` is a report written by :func:`page` (its first 4 KiB)."""
    with path.open("rb") as file:
        return GENERATOR.encode() in file.read(4096)
