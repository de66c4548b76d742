"""The self-contained HTML page of a run: every image inlined as base64 (`<img src="data:image/png;base64,...">`),
no scripts, no external files, so the page can be mailed, attached to a CI job or opened offline."""
from __future__ import annotations

import base64
import html
import json

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1500px;
       color: #222; padding: 0 1em; box-sizing: border-box; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0; max-width: 100%; }
td, th { border: 1px solid #ccc; padding: 3px 10px; text-align: left; font-size: 0.92em; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num { text-align: right; font-family: monospace; }
td.text { font-family: monospace; white-space: pre-wrap; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; white-space: pre-wrap; }
img { max-width: 100%; height: auto; display: block; }
figure { margin: 0; min-width: 0; }
figcaption { font-size: 0.85em; color: #555; margin-top: 0.3em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 560px), 1fr)); gap: 1.2em;
        align-items: start; }
.grid > .wide { grid-column: 1 / -1; }
.scroll { overflow-x: auto; }
.note { color: #8a5a00; } .error { color: #b00020; }
"""


def esc(x, quote: bool = True) -> str:
    return html.escape(str(x), quote=quote)


def pre(text: str) -> str:
    """Preformatted text (config, traceback): only <, > and & need escaping there."""
    return f"<pre>{esc(text, quote=False)}</pre>"


def img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def figure(png: bytes, alt: str, caption: str = "", wide: bool = False) -> str:
    """An inlined PNG; `wide` spans both columns of a .grid (the attention map)."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    cls = ' class="wide"' if wide else ""
    return f"<figure{cls}>{img(png, alt)}{cap}</figure>"


def grid(items: list[str]) -> str:
    """Figures in one column on narrow windows, two (or more) on wide ones."""
    return '<div class="grid">\n' + "\n".join(items) + "\n</div>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def kv_table(rows: list[tuple[str, object]], css_id: str = "") -> str:
    ident = f' id="{esc(css_id)}"' if css_id else ""
    body = "".join(f"<tr><th>{esc(k)}</th><td class=\"num\">{esc(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table{ident}>{body}</table>"


def words_table(rows: list[tuple[str, str, str]], css_id: str = "") -> str:
    """(raw key, words, value text) rows: the words shown, the raw key as the row's tooltip."""
    ident = f' id="{esc(css_id)}"' if css_id else ""
    body = "".join(f'<tr><th title="{esc(k)}">{esc(w)}</th><td>{esc(v)}</td></tr>' for k, w, v in rows)
    return f"<table{ident}>{body}</table>"


def table(header: list[str], rows: list[list[str]], css_id: str = "", text_cols: tuple = ()) -> str:
    """A plain table; columns in text_cols are shown as preformatted text (samples)."""
    ident = f' id="{esc(css_id)}"' if css_id else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    text = ' class="text"'
    body = "".join("<tr>" + "".join(f'<td{text if i in text_cols else ""}>{esc(c)}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table{ident}><tr>{head}</tr>{body}</table></div>'


def records_table(records: list[dict], css_id: str = "") -> str:
    """A list of flat dicts (e.g. ranks.json) as one table, columns in first-seen order."""
    if not records:
        return ""
    cols = list(dict.fromkeys(k for r in records for k in r))
    ident = f' id="{esc(css_id)}"' if css_id else ""
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in records)
    return f"<table{ident}><tr>{head}</tr>{body}</table>"


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """sections: (heading, inner HTML) in order."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for heading, inner in sections:
        parts.append(f"<section><h2>{esc(heading)}</h2>\n{inner}\n</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


__all__ = ["page", "figure", "grid", "img", "kv_table", "words_table", "table", "records_table", "esc", "pre"]
