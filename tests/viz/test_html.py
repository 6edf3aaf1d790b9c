"""render_token_credit / render_page / `creditlab inspect`: escaping, masking, colours, completeness."""

import json
import re

import pytest

from creditlab.viz.html import credit_color, render_page, render_token_credit, visible_token
from creditlab.viz.inspect import available_steps, inspect_run, samples_path


def test_tokens_are_escaped():
    html = render_token_credit(["<script>alert(1)</script>", '"&\'', "ok"], [1.0, -1.0, 0.0], [True] * 3)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&amp;" in html
    # the title attribute cannot be broken out of: no raw quote from the token inside it
    assert all('"' not in t for t in re.findall(r'title="([^"]*)"', html))


def test_masked_tokens_are_not_coloured_and_have_no_value():
    html = render_token_credit(["a", "b", "c"], [0.5, 9.0, -0.5], [True, False, True])
    masked = re.search(r'<span class="tok masked"[^>]*>', html).group(0)
    assert "background" not in masked and "data-adv" not in masked
    # the masked token's huge value does not set the scale: 0.5 is fully saturated
    assert credit_color(0.5, 0.5) in html


def test_zero_advantage_is_white():
    html = render_token_credit(["x"], [0.0], [True], scale=1.0)
    assert "background:#ffffff" in html
    assert credit_color(0.0, 3.0) == "#ffffff"


def test_sign_picks_the_colour_side():
    pos, neg = credit_color(0.7, 1.0), credit_color(-0.7, 1.0)
    r, _, b = (int(pos[i:i + 2], 16) for i in (1, 3, 5))
    assert r > b  # positive: red side
    r, _, b = (int(neg[i:i + 2], 16) for i in (1, 3, 5))
    assert b > r  # negative: blue side
    assert credit_color(2.0, 1.0) == credit_color(1.0, 1.0)  # clipped at the scale
    assert credit_color(0.5, 1.0) != credit_color(1.0, 1.0)  # and graded inside it


def test_whitespace_is_visible():
    assert "↵" in visible_token("\n") and "<br>" in visible_token("\n")
    assert visible_token("  ").count("·") == 2
    assert "⇥" in visible_token("\t") and "∅" in visible_token("")
    assert "\\x07" in visible_token("\x07")
    assert visible_token(" the") == " the"  # ordinary leading spaces stay spaces


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="same length"):
        render_token_credit(["a", "b"], [1.0], [True, True])


def _rows():
    return [{"group": 3, "reward": 1.0, "prompt": "2+2=<?>", "tokens": ["4", "\n", "<b>"],
             "advantages": [1.5, 0, -0.2]},
            {"group": 3, "reward": 0.0, "prompt": "2+2=<?>", "tokens": ["5", " "], "advantages": [-1.5, -0.1]},
            {"group": 8, "reward": 0.0, "prompt": "x", "tokens": ["y"], "advantages": [0.0]}]


def test_page_contains_every_token_grouped_by_prompt():
    page = render_page(_rows(), title="t <x>", meta="estimator tempo")
    assert page.startswith("<!DOCTYPE html>")
    assert len(re.findall(r'<span class="tok[ "]', page)) == 6
    assert page.count('class="group"') == 2 and "2+2=&lt;?&gt;" in page and "&lt;b&gt;" in page
    assert "reward 1" in page and "mean reward 0.5" in page
    assert "http" not in page.replace("http-equiv", "")  # no external assets
    assert "+1.5" in page and "-1.5" in page  # symmetric legend from the page's max |advantage|


def test_inspect_run_picks_latest_step_and_reads_estimator(tmp_path):
    (tmp_path / "samples").mkdir()
    for step in (2, 10):
        (tmp_path / "samples" / f"step_{step:06d}.json").write_text(json.dumps({"rows": _rows()}))
    (tmp_path / "config.json").write_text(json.dumps({"run": {"estimator": "treepo"}}))
    assert available_steps(tmp_path) == [2, 10]
    out = inspect_run(tmp_path)
    assert out == tmp_path / "inspect" / "step_000010.html"
    text = out.read_text()
    assert "treepo" in text and "step 10" in text
    out2 = inspect_run(tmp_path, step=2, out=tmp_path / "x.html")
    assert "step 2" in out2.read_text()
    with pytest.raises(FileNotFoundError, match=r"available steps: \[2, 10\]"):
        samples_path(tmp_path, 5)
    with pytest.raises(FileNotFoundError, match="no samples"):
        inspect_run(tmp_path / "inspect")
