"""The chat page's compare mode and token view in real headless Chromium, against the real
native server serving two tiny runs at once (issue 17): ``base-run`` (the server's own model,
8192-token context) and ``sharp-run`` (picked with ``adapter_id``; a 128-token context and
sharper probabilities). Every test speaks HTTP and drives the page only.

Screenshots of compare mode and the token view go to test-artifacts/web/ (git-ignored).
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from conftest import build_tiny_model
from web_harness import (  # noqa: F401 (pytest fixtures)
    ARTIFACTS,
    FINISH_REASONS,
    SAMPLING,
    XSS,
    auth,
    browser_fixture,
    bucket,
    endless_message,
    expected_prompt,
    open_chat_fixture,
    running_server,
)

pytestmark = pytest.mark.slow

BASE, SHARP = "base-run", "sharp-run"
CSP_WATCH = """() => { window.violations = [];
  document.addEventListener('securitypolicyviolation',
                            e => window.violations.push(e.effectiveDirective)); }"""


# --- two runs, served at once ---------------------------------------------------------------


def build_runs(root: Path) -> dict[str, Path]:
    """Two tiny random runs. sharp-run's embedding (tied to its output layer) is scaled up, so
    its next-token distributions are peaked rather than near uniform: its tokens land in every
    probability bucket, as a trained model's would."""
    import torch
    from transformers import GPT2LMHeadModel

    base = build_tiny_model(root / BASE / "model", n_positions=8192, seed=0)
    sharp = build_tiny_model(root / SHARP / "model", n_positions=128, seed=1)
    model = GPT2LMHeadModel.from_pretrained(sharp)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(5.0)
    model.save_pretrained(sharp)
    return {BASE: base, SHARP: sharp}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return build_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def compare_server(runs):
    """``python -m serving.server`` with both runs: base-run first (its own model, the one
    /info describes), sharp-run picked by ``adapter_id``."""
    with running_server(runs[BASE], "--model", str(runs[SHARP])) as url:
        yield url


# --- helpers --------------------------------------------------------------------------------


def column(i: int) -> str:
    return f'#columns .column[data-index="{i}"]'


def compare(chat, *ticked: str) -> None:
    """Open the page's compare mode with these models ticked (base-run is ticked already)."""
    chat.wait_online()
    chat.wait("!document.getElementById('models').hidden")
    for name in ticked:
        chat.page.check(f'#model-boxes input[value="{name}"]')
    chat.wait(f"document.querySelectorAll('#columns .column').length === {1 + len(ticked)}")


def wait_columns(chat, answers: int, columns: int = 2) -> list[list[dict]]:
    """Wait until every column has `answers` answers, the last one finished; each column's
    answers (text, finish reason, statistics; a loaded answer may have none)."""
    chat.wait(
        f"[...document.querySelectorAll('#columns .column')].length === {columns}"
        " && [...document.querySelectorAll('#columns .column')].every(c => {"
        "   const a = c.querySelectorAll('.assistant');"
        f"  return a.length === {answers} && a[a.length - 1].querySelector('.finish'); }})"
        " && !document.querySelector('#columns .streaming')",
        timeout=60_000,
    )
    return chat.page.evaluate(
        """() => [...document.querySelectorAll('#columns .column')].map(c =>
             [...c.querySelectorAll('.assistant')].map(a => ({
               text: a.querySelector('.bubble').textContent,
               finish: a.querySelector('.finish')?.textContent ?? null,
               stats: a.querySelector('.stats').textContent })))"""
    )


def requests_for(chat, model: str | None) -> list[dict]:
    """The /generate_stream requests the page sent for a model (None: the server's own)."""
    return [r for r in chat.requests if r["parameters"].get("adapter_id") == model]


# --- compare mode ---------------------------------------------------------------------------


def test_one_message_goes_to_both_models_side_by_side(compare_server, open_chat):
    chat = open_chat(compare_server)
    chat.wait_online()
    listed = httpx.get(f"{compare_server}/v1/models", headers=auth()).json()
    assert [m["id"] for m in listed["data"]] == [BASE, SHARP]
    # Until a second model is ticked, the page is the one-model page.
    boxes = chat.page.eval_on_selector_all(
        "#model-boxes label",
        "ls => ls.map(l => [l.textContent.trim(), l.querySelector('input').checked])",
    )
    assert boxes == [[f"{BASE} (the server's own)", True], [SHARP, False]]
    assert chat.page.is_hidden(f"{column(0)} .column-head")
    compare(chat, SHARP)
    assert chat.page.text_content(f"{column(0)} .column-title") == BASE
    assert chat.page.text_content(f"{column(1)} .column-title") == SHARP
    assert (
        chat.page.get_attribute(f"{column(1)} .log", "aria-label") == f"Conversation with {SHARP}"
    )

    chat.set(max_new_tokens=12, **SAMPLING)
    chat.send("Name three colors.")
    (first,), (second,) = wait_columns(chat, 1)
    for answer in (first, second):
        assert answer["finish"] in FINISH_REASONS
        assert re.search(r"\d+ tokens · [\d.]+ tok/s · first token \d+ ms", answer["stats"])
    own, other = requests_for(chat, None)[-1], requests_for(chat, SHARP)[-1]
    assert own["inputs"] == other["inputs"] == expected_prompt("Name three colors.")
    assert (
        chat.page.eval_on_selector_all(".msg.user .bubble", "b => b.map(e => e.textContent)")
        == ["Name three colors."] * 2
    )

    # Regenerate one column: only that model is asked again; the other keeps its answer.
    n_own, n_other = len(requests_for(chat, None)), len(requests_for(chat, SHARP))
    chat.page.click(f"{column(1)} .column-regenerate")
    (first_again,), (_,) = wait_columns(chat, 1)
    assert len(requests_for(chat, None)) == n_own
    assert len(requests_for(chat, SHARP)) == n_other + 1
    assert first_again == first
    chat.page.screenshot(path=str(ARTIFACTS / "compare-desktop.png"))


def test_stop_one_column_while_the_other_answers_in_full(compare_server, open_chat, runs):
    """base-run is asked for 8000 greedy tokens that never end and stopped from its column at
    its first token; sharp-run, whose context is 128 tokens (the page learns it from the server's
    422), answers in full. Deterministic: base-run's answer takes seconds."""
    message = endless_message(compare_server, "base-run")
    chat = open_chat(compare_server)
    compare(chat, SHARP)
    chat.set(max_new_tokens=8000, temperature=0, repetition_penalty=1)
    chat.page.evaluate(
        f"""() => new MutationObserver((recs, obs) => {{
             if (recs.some(r => r.type === 'characterData')) {{
               obs.disconnect(); document.querySelector('{column(0)} .column-stop').click(); }}
           }}).observe(document.querySelector('{column(0)} .log'),
                       {{subtree: true, characterData: true}})"""
    )
    chat.send(message)
    (stopped,), (full,) = wait_columns(chat, 1)
    assert stopped["finish"] == "stopped"
    assert 1 <= int(re.match(r"(\d+) tokens", stopped["stats"]).group(1)) < 8000
    assert full["finish"] in FINISH_REASONS
    # The page learnt sharp-run's context from its 422 and capped the answer to the room left.
    sharp_requests = requests_for(chat, SHARP)
    assert sharp_requests[0]["parameters"]["max_new_tokens"] == 8000
    capped = sharp_requests[-1]["parameters"]["max_new_tokens"]
    assert f"answer capped at {capped} tokens to fit" in full["stats"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runs[SHARP])
    assert len(tokenizer(sharp_requests[-1]["inputs"])["input_ids"]) + capped <= 128
    assert chat.page.is_enabled("#send") and chat.page.is_disabled("#stop")


def test_each_column_fits_its_own_models_context(compare_server, open_chat, tmp_path, runs):
    from transformers import AutoTokenizer

    chat = open_chat(compare_server)
    compare(chat, SHARP)
    turns = []
    for i in range(3):
        turns += [
            {"role": "user", "content": f"old question {i} " + "words " * 12},
            {"role": "assistant", "content": f"old answer {i} " + "more " * 12},
        ]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(turns))  # a conversation loads into every column
    chat.page.set_input_files("#load-file", str(path))
    chat.wait("document.querySelectorAll('#columns .msg').length === 12")
    chat.set(max_new_tokens=24, **SAMPLING)
    chat.send("the newest question")
    (*_, own), (*_, other) = wait_columns(chat, 4)
    assert own["finish"] in FINISH_REASONS and other["finish"] in FINISH_REASONS
    assert "left out" not in own["stats"]  # 8192 tokens hold it all
    assert re.search(r"\d+ older turns? left out to fit", other["stats"])
    sent = requests_for(chat, SHARP)[-1]
    assert (
        "old question 0" not in sent["inputs"]
        and "old question 0" in requests_for(chat, None)[-1]["inputs"]
    )
    tokenizer = AutoTokenizer.from_pretrained(runs[SHARP])
    assert len(tokenizer(sent["inputs"])["input_ids"]) + sent["parameters"]["max_new_tokens"] <= 128


# --- the token view -------------------------------------------------------------------------


def test_token_view_shows_what_the_model_weighed_while_streaming(compare_server, open_chat):
    chat = open_chat(compare_server)
    chat.page.evaluate(CSP_WATCH)
    compare(chat, SHARP)
    chat.page.check("#colour-tokens")  # colours turn the token view on too
    assert chat.page.is_checked("#show-tokens") and chat.page.is_visible("#token-legend")
    # Seeded (Settings → Seed), so the buckets asserted below do not hang on luck.
    chat.set(max_new_tokens=40, top_n_tokens=5, seed=0, **SAMPLING)
    # At the first token of each column, from inside the page (so, mid-stream for certain):
    # focus it and note what the tip shows.
    chat.page.evaluate(
        """() => { window.seen = [];
          for (const log of document.querySelectorAll('#columns .log')) {
            new MutationObserver((recs, obs) => {
              const tok = log.querySelector('.assistant .tok');
              if (!tok) return;
              obs.disconnect();
              tok.focus();
              const tip = document.getElementById('token-tip');
              window.seen.push({
                streaming: tok.closest('.assistant').classList.contains('streaming'),
                hidden: tip.hidden, alternatives: tip.querySelectorAll('.tip-alts li').length,
                head: tip.querySelector('.tip-text').textContent,
                label: tok.getAttribute('aria-label') });
            }).observe(log, { childList: true, subtree: true });
          } }"""
    )
    chat.send("Say something.")
    wait_columns(chat, 1)
    seen = chat.page.evaluate("window.seen")
    assert len(seen) == 2
    for s in seen:
        assert s["streaming"] is True and s["hidden"] is False  # while streaming
        assert s["alternatives"] == 5 and s["head"].startswith("“")
        assert "; weighed " in s["label"] and s["label"].count("%") == 6
    assert requests_for(chat, None)[-1]["parameters"]["top_n_tokens"] == 5
    # Every column draws with the seed the settings say.
    both = requests_for(chat, None) + requests_for(chat, SHARP)
    assert len(both) >= 2 and {r["parameters"]["seed"] for r in both} == {0}

    # Each token: shown with its probability's bucket, named for a screen reader, its
    # alternatives sorted and (where it is among them) carrying its own logprob.
    shown = chat.page.evaluate(
        """() => [...document.querySelectorAll('#columns .assistant .bubble')].map(b =>
             [...b.querySelectorAll('.tok')].map(t =>
               [t.dataset.p, t.tabIndex, t.getAttribute('aria-label')]))"""
    )
    records = chat.page.evaluate(
        "window.tinycloudChat.state.columns.map(c => c.messages.at(-1).tokens)"
    )
    buckets = set()
    for tokens, spans in zip(records, shown, strict=True):
        assert len(tokens) == len(spans) > 0
        assert [tab for _, tab, _ in spans] == [0] + [-1] * (len(spans) - 1)  # one tab stop
        for tok, (p, _, label) in zip(tokens, spans, strict=True):
            assert p == bucket(tok["logprob"]) and label
            buckets.add(p)
            top = [t["logprob"] for t in tok["top"]]
            assert len(top) == 5 and top == sorted(top, reverse=True)
            mine = [t for t in tok["top"] if t["id"] == tok["id"]]
            assert not mine or abs(mine[0]["logprob"] - tok["logprob"]) < 1e-4
    assert len(buckets) >= 2, buckets  # sharp-run's tokens spread over the buckets

    # Hover with the real mouse, then the keyboard: arrows move, Esc hides the tip.
    second = chat.page.locator(f"{column(1)} .assistant .tok").nth(1)
    second.hover()
    chat.wait("!document.getElementById('token-tip').hidden")
    tip_head = chat.page.text_content("#token-tip .tip-text")
    assert tip_head == "“" + records[1][1]["text"].replace("\n", "↵") + "”"
    chat.page.screenshot(path=str(ARTIFACTS / "token-view.png"))
    first = chat.page.locator(f"{column(0)} .assistant .tok").first
    first.focus()
    chat.page.keyboard.press("ArrowRight")
    assert chat.page.evaluate("document.activeElement.tabIndex") == 0
    assert chat.page.evaluate(
        f"document.activeElement === document.querySelectorAll('{column(0)} .assistant .tok')[1]"
    )
    chat.page.keyboard.press("Escape")
    assert chat.page.is_hidden("#token-tip")
    assert chat.page.is_disabled("#stop")  # Esc on a token hides its tip only

    # Colours by class, under the page's CSP: a sure token and an unsure one differ; off, none.
    def background(p: str) -> str:
        return chat.page.evaluate(
            f"getComputedStyle(document.querySelector('.tok[data-p=\"{p}\"]')).backgroundColor"
        )

    coloured = {p: background(p) for p in buckets}
    assert len(set(coloured.values())) == len(buckets)
    chat.page.uncheck("#colour-tokens")
    assert {background(p) for p in buckets} == {"rgba(0, 0, 0, 0)"}
    chat.page.uncheck("#show-tokens")
    assert chat.page.locator("#columns .tok").count() == 0  # text again
    assert chat.page.evaluate("window.violations") == []


# --- a comparison as files ------------------------------------------------------------------


class _Cells(HTMLParser):
    """The text of each table cell in rendered HTML (a <br> read as a newline), and every tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.tags: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def rendered_cells(markdown: str) -> _Cells:
    from markdown_it import MarkdownIt

    cells = _Cells()
    # CommonMark with raw HTML on, plus GitHub's tables and strikethrough.
    cells.feed(MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown))
    return cells


NASTY = [
    "pipes | in | a cell",
    "*emphasis* _under_ `code` [link](http://x) ![img](y) ~~gone~~ $x^2$ &amp; \\ end",
    *XSS,
]


def test_export_load_and_markdown_of_a_comparison(compare_server, open_chat, tmp_path):
    chat = open_chat(compare_server)
    chat.context.grant_permissions(["clipboard-read", "clipboard-write"])
    compare(chat, SHARP)
    chat.set(max_new_tokens=6, **SAMPLING)
    chat.send("First | question *here*")
    (first,), (second,) = wait_columns(chat, 1)
    with chat.page.expect_download() as dl:
        chat.page.click("#export")
    doc = json.loads(Path(dl.value.path()).read_text())
    assert dl.value.suggested_filename.startswith("comparison-")
    assert doc["format"] == "tinycloud-comparison" and doc["version"] == 1
    assert [(c["model"], c["own"]) for c in doc["columns"]] == [(BASE, True), (SHARP, False)]
    answers = [c["messages"][1] for c in doc["columns"]]
    assert [a["content"] for a in answers] == [first["text"], second["text"]]
    assert all(len(a["tokens"]) == a["meta"]["tokens"] and a["tokens"][0]["top"] for a in answers)

    # Cleared, then loaded back whole; a broken one is refused with where and why.
    chat.page.click("#clear")
    assert chat.page.locator("#columns .msg").count() == 0
    saved = tmp_path / "comparison.json"
    saved.write_text(json.dumps(doc))
    chat.page.set_input_files("#load-file", str(saved))
    assert wait_columns(chat, 1) == [[first], [second]]
    broken = json.loads(json.dumps(doc))
    broken["columns"][1]["messages"][0]["role"] = "bot"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    chat.page.set_input_files("#load-file", str(bad))
    chat.wait("document.getElementById('error').textContent !== ''")
    assert chat.page.text_content("#error") == (
        'Could not load bad.json: columns[1].messages[0].role is "bot"; '
        'it must be "user" or "assistant".'
    )
    assert wait_columns(chat, 1) == [[first], [second]]  # nothing lost

    # Markdown: hostile text in every cell renders as the text it is, in a real renderer.
    nasty = json.loads(json.dumps(doc))
    for i, text in enumerate(NASTY[:2]):
        nasty["columns"][i]["messages"][1]["content"] = text + "\nsecond line"
    nasty["columns"][0]["messages"][0]["content"] = nasty["columns"][1]["messages"][0][
        "content"
    ] = " ".join(XSS)
    loaded = tmp_path / "nasty.json"
    loaded.write_text(json.dumps(nasty))
    chat.page.set_input_files("#load-file", str(loaded))
    chat.wait("document.getElementById('notice').textContent.startsWith('Loaded a comparison')")
    with chat.page.expect_download() as dl:
        chat.page.click("#export-md")
    markdown = Path(dl.value.path()).read_text()
    (ARTIFACTS / "comparison.md").write_text(markdown)
    cells = rendered_cells(markdown)
    header, row = cells.rows
    assert header == ["Turn", "You", BASE, SHARP]
    assert row[0] == "1" and row[1] == " ".join(XSS)
    for i, text in enumerate(NASTY[:2]):
        answer = nasty["columns"][i]["messages"][1]
        stats = f"{answer['meta']['finish_reason']} · {answer['meta']['tokens']} tokens · "
        assert row[2 + i].startswith(text + "\nsecond line\n\n" + stats), row[2 + i]
    # No markup came out of the text: the only emphasis is the page's own, around each stats line.
    assert not {"img", "script", "svg", "a", "strong", "code", "del"} & set(cells.tags)
    assert cells.tags.count("em") == 2


# --- phone width, and everything labelled ---------------------------------------------------


def test_compare_at_phone_width_swipes_between_columns(compare_server, open_chat):
    chat = open_chat(
        compare_server, viewport={"width": 390, "height": 844}, name="phone.html", has_touch=True
    )
    compare(chat, SHARP)
    assert chat.page.evaluate("document.activeElement.value") == SHARP  # focus kept on its box
    assert chat.page.evaluate("document.getElementById('settings-box').open") is False
    chat.page.click("#settings-title")
    chat.set(max_new_tokens=16, **SAMPLING)
    chat.page.click("#settings-title")
    chat.send("Hello from a phone")
    wait_columns(chat, 1)
    page = chat.page
    assert (
        page.evaluate("document.documentElement.scrollWidth") <= 390
    )  # the page does not scroll sideways
    strip = page.evaluate(
        """() => { const c = document.getElementById('columns');
                   return { scroll: c.scrollWidth, client: c.clientWidth,
                            widths: [...c.children].map(e => e.getBoundingClientRect().width) };
                 }"""
    )
    assert strip["scroll"] > strip["client"]  # the columns swipe, one beside the other
    assert all(200 < w <= 390 for w in strip["widths"])
    # The conversation has most of the screen: header, composer and settings bar take the rest.
    height = page.evaluate("document.getElementById('scroller').getBoundingClientRect().height")
    assert height >= 0.55 * 844, height
    page.screenshot(path=str(ARTIFACTS / "compare-phone.png"))
    # Swipe to the second column, and tap a token there to see what the model weighed.
    page.locator(f"{column(1)} .column-head").scroll_into_view_if_needed()
    page.check("#show-tokens")
    page.locator(f"{column(1)} .assistant .tok").nth(2).tap()
    chat.wait("!document.getElementById('token-tip').hidden")
    tip = page.locator("#token-tip").bounding_box()
    assert tip and tip["x"] >= 0 and tip["x"] + tip["width"] <= 390
    page.screenshot(path=str(ARTIFACTS / "compare-phone-second-column.png"))


def test_compare_controls_are_labelled(compare_server, open_chat):
    chat = open_chat(compare_server)
    compare(chat, SHARP)
    chat.page.check("#show-tokens")
    chat.set(max_new_tokens=4, **SAMPLING)
    chat.send("Hi")
    wait_columns(chat, 1)
    unnamed = chat.page.evaluate(
        """() => [...document.querySelectorAll('input, textarea, button, summary, [tabindex]')]
              .filter(e => !((e.labels && e.labels.length) || e.getAttribute('aria-label')
                             || e.textContent.trim()))
              .map(e => e.outerHTML)"""
    )
    assert unnamed == []
    names = chat.page.eval_on_selector_all(
        ".column-regenerate, .column-stop", "bs => bs.map(b => b.getAttribute('aria-label'))"
    )
    assert names == [
        f"Regenerate the last answer of {BASE}",
        f"Stop {BASE}'s answer",
        f"Regenerate the last answer of {SHARP}",
        f"Stop {SHARP}'s answer",
    ]
    roles = chat.page.eval_on_selector_all(
        "#columns .log", "ls => ls.map(l => [l.getAttribute('role'), l.getAttribute('aria-live')])"
    )
    assert roles == [["log", "polite"], ["log", "polite"]]
    assert chat.page.get_attribute(f"{column(0)} .assistant .bubble", "role") == "group"
