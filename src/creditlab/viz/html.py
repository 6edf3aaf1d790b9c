"""Token-level credit as HTML: `render_token_credit(...)` (a fragment) and `render_page(...)` (a whole page).

Colours: a diverging blue-white-red scale (ColorBrewer RdBu end points, readable with the common colour-vision
deficiencies), centred at 0 and symmetric: ±`scale` maps to the saturated ends, 0 to white. The page uses one
scale for every row (the largest |advantage| on it) so colours compare across responses.

Tokens are HTML-escaped; whitespace that would vanish is drawn: a newline becomes "↵" plus a line break, a tab
"⇥", a token made only of spaces "·" per space, an empty token "∅", other control characters "\\xNN".
Masked tokens (mask False, e.g. padding or observation tokens) are drawn grey without colour or value.

The page is self-contained (inline CSS and a few lines of inline JS, no external assets); the value of a token
shows on hover (its `title`, plus a fixed read-out line at the top of the page).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

NEGATIVE_RGB = (33, 102, 172)  # RdBu blue  #2166ac
POSITIVE_RGB = (178, 24, 43)  # RdBu red   #b2182b
NEUTRAL_RGB = (255, 255, 255)
_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def credit_color(value: float, scale: float) -> str:
    """Background colour '#rrggbb' of an advantage `value` on a symmetric scale [-scale, scale] (0 -> white)."""
    if scale <= 0 or not math.isfinite(value) or value == 0:
        return "#ffffff"
    t = min(abs(value) / scale, 1.0)
    end = POSITIVE_RGB if value > 0 else NEGATIVE_RGB
    rgb = (round(n + (e - n) * t) for n, e in zip(NEUTRAL_RGB, end))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def visible_token(token: str) -> str:
    """HTML for one token's text: escaped, with newlines/tabs/space-only/empty tokens made visible."""
    if token == "":
        return '<span class="ws">∅</span>'
    if token.strip(" ") == "":
        return f'<span class="ws">{"·" * len(token)}</span>'
    parts = []
    for ch in token:
        if ch in _VISIBLE:
            parts.append(f'<span class="ws">{_VISIBLE[ch]}</span>' + ("<br>" if ch == "\n" else ""))
        elif ord(ch) < 32 or ord(ch) == 127:
            parts.append(f'<span class="ws">\\x{ord(ch):02x}</span>')
        else:
            parts.append(html.escape(ch, quote=False))
    return "".join(parts)


def page_scale(advantages: Sequence[Sequence[float]], masks: Sequence[Sequence[bool]] | None = None) -> float:
    """The largest finite |advantage| over valid tokens (1.0 when there is none or all are 0)."""
    best = 0.0
    for i, row in enumerate(advantages):
        mask = masks[i] if masks is not None else [True] * len(row)
        for a, m in zip(row, mask):
            if m and math.isfinite(a):
                best = max(best, abs(float(a)))
    return best if best > 0 else 1.0


def render_token_credit(tokens: list[str], advantages: Sequence[float], mask: Sequence[bool], *,
                        scale: float | None = None) -> str:
    """One response as an HTML fragment: one `<span class="tok">` per token coloured by its advantage.

    tokens:     decoded text of each token [T].
    advantages: credit of each token [T] (any float sequence, e.g. a list or a 1-D tensor's `.tolist()`).
    mask:       True on tokens that carry credit [T]; False tokens become `<span class="tok masked">`, uncoloured.
    scale:      |advantage| drawn fully saturated (default: the largest |advantage| in this fragment).
    """
    advantages, mask = [float(a) for a in advantages], [bool(m) for m in mask]
    if not len(tokens) == len(advantages) == len(mask):
        raise ValueError(f"render_token_credit: tokens ({len(tokens)}), advantages ({len(advantages)}) and mask "
                         f"({len(mask)}) must have the same length")
    if scale is None:
        scale = page_scale([advantages], [mask])
    spans = []
    for i, (tok, a, m) in enumerate(zip(tokens, advantages, mask)):
        text = visible_token(tok)
        label = html.escape(repr(tok), quote=True)
        if not m:
            spans.append(f'<span class="tok masked" data-i="{i}" title="{label}: masked (no credit)">{text}</span>')
            continue
        t = min(abs(a) / scale, 1.0) if scale > 0 and math.isfinite(a) else 0.0
        ink = ";color:#ffffff" if t > 0.55 else ""
        spans.append(f'<span class="tok" data-i="{i}" data-adv="{a:.6g}" title="{label}: {a:+.4f}" '
                     f'style="background:{credit_color(a, scale)}{ink}">{text}</span>')
    return f'<div class="resp">{"".join(spans)}</div>'


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fff}
h1{font-size:1.3em;margin:.2em 0} .meta{color:#555;margin-bottom:.6em}
.legend{display:flex;align-items:center;gap:.5em;margin:.5em 0 1em}
.bar{width:260px;height:14px;border:1px solid #999;background:linear-gradient(90deg,%s,#ffffff,%s)}
#readout{position:sticky;top:0;background:#f4f4f4;border:1px solid #ddd;padding:.3em .6em;
 font-family:ui-monospace,monospace;min-height:1.3em;z-index:1}
.group{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.5em .8em}
.prompt{white-space:pre-wrap;font-family:ui-monospace,monospace;background:#fafafa;padding:.4em;
 border-left:3px solid #bbb;margin:.3em 0 .6em}
.row{margin:.5em 0} .reward{font-weight:600;font-size:.9em;color:#333}
.resp{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.6;word-break:break-all}
.tok{border-radius:2px;padding:0 1px;cursor:default;box-shadow:inset -1px 0 0 rgba(0,0,0,.12)}
.tok:hover{outline:2px solid #000}
.tok.masked{color:#999;background:none}
.ws{opacity:.6}
"""
_JS = """
document.addEventListener('mouseover', function (e) {
  var t = e.target.closest ? e.target.closest('.tok') : null;
  if (t) { document.getElementById('readout').textContent = t.title; }
});
"""


def _group_rows(rows: Sequence[Mapping[str, Any]]) -> dict[Any, list[Mapping[str, Any]]]:
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get("group", 0), []).append(row)
    return groups


def _row_mask(row: Mapping[str, Any]) -> list[bool]:
    return [bool(m) for m in row.get("mask", [True] * len(row["tokens"]))]


def render_page(rows: Sequence[Mapping[str, Any]], *, title: str = "creditlab inspect", meta: str = "") -> str:
    """A self-contained HTML page of sampled responses grouped by prompt, each coloured by its advantages.

    rows: dicts with "tokens" [T] (str), "advantages" [T] (float) and optionally "group", "reward", "prompt",
          "mask" [T] (bool) -- the rows of a `samples/step_XXXXXX.json` file written by the trainer.
    meta: one line of context shown under the title (estimator, step, ...), HTML-escaped.
    """
    scale = page_scale([r["advantages"] for r in rows], [_row_mask(r) for r in rows])
    all_zero = not any(a != 0 for r in rows for a, m in zip(r["advantages"], _row_mask(r)) if m)
    parts = []
    for gid, members in _group_rows(rows).items():
        rewards = [float(r.get("reward", float("nan"))) for r in members]
        mean = sum(rewards) / len(rewards)
        prompt = html.escape(str(members[0].get("prompt", "")), quote=False)
        body = "".join(
            f'<div class="row"><span class="reward">reward {float(r.get("reward", float("nan"))):.3g}</span>'
            f'{render_token_credit(list(r["tokens"]), r["advantages"], _row_mask(r), scale=scale)}</div>'
            for r in members)
        parts.append(f'<section class="group"><h2 style="font-size:1em;margin:.2em 0">group '
                     f'{html.escape(str(gid))} &middot; {len(members)} responses &middot; mean reward {mean:.3g}</h2>'
                     f'<div class="prompt">{prompt or "<i>(no prompt)</i>"}</div>{body}</section>')
    neg, pos = credit_color(-1.0, 1.0), credit_color(1.0, 1.0)
    legend = (f'<div class="legend">advantage <span>{-scale:+.3g}</span><span class="bar"></span>'
              f'<span>{scale:+.3g}</span> (white = 0; masked tokens grey)'
              f'{"; every advantage on this page is 0" if all_zero else ""}</div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS % (neg, pos)}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><div class=\"meta\">{html.escape(meta)}</div>{legend}"
            f"<div id=\"readout\">hover a token to see its advantage</div>{''.join(parts)}"
            f"<script>{_JS}</script></body></html>\n")
