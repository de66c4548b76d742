"""The self-contained HTML page of a run: every image inlined as base64 (`<img src="data:image/png;base64,...">`),
no scripts, no external files, so the page can be mailed, attached to a CI job or opened offline."""
from __future__ import annotations

import base64
import html
import json

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 3px 10px; text-align: left; font-size: 0.92em; }
td.num { text-align: right; font-family: monospace; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; max-width: 640px; }
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


def figure(png: bytes, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{img(png, alt)}{cap}</figure>"


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


__all__ = ["page", "figure", "img", "kv_table", "records_table", "esc", "pre"]
