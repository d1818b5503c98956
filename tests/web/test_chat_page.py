"""The rendered chat page in real headless Chromium, against the real native server.

One server (tiny random GPT-2, an API key, CORS for ``null`` = a page opened from disk) and one
browser serve the whole module; every test opens the page from a file in a fresh browser
context, so localStorage starts empty. Screenshots land in test-artifacts/web/.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import httpx
import pytest
from conftest import build_tiny_model, free_port
from web_harness import (  # noqa: F401 (pytest fixtures)
    API_KEY,
    ARTIFACTS,
    FINISH_REASONS,
    SAMPLING,
    XSS,
    browser_fixture,
    bucket,
    endless_message,
    expected_prompt,
    open_chat_fixture,
    running_server,
)
from web_harness import auth as _auth

from remote.jobs.prompts import PROMPT_FORMAT
from serving import constants as C

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir) as base:
        yield base


# --- the page and the stream --------------------------------------------------------------------


def test_page_shows_server_model_and_format(server, open_chat):
    info = httpx.get(f"{server}/info", headers=_auth()).json()
    chat = open_chat(server)
    chat.wait_online()
    page = chat.page
    assert page.text_content("#server-url") == server
    assert server in page.title()
    assert page.text_content("#health-text") == "online"
    assert page.text_content("#model-name") == info["model_id"]
    assert page.text_content("#about-format") == "from the server (/info)"
    assert str(info["max_total_tokens"]) in page.text_content("#about-context")
    assert page.evaluate("document.activeElement.id") == "input"


def test_one_model_is_the_plain_page_and_its_tokens_can_be_inspected(server, open_chat):
    """With one model served there are no compare controls and no adapter_id is sent. The
    token view shows the real server's tokens with their own probabilities, and the alternatives
    once the server answers top_n_tokens (issue 15); until then the page asks, gets TGI's 422,
    says so under Settings, and asks again without."""
    chat = open_chat(server)
    chat.wait_online()
    assert chat.page.is_hidden("#models")
    assert chat.page.locator("#columns .column").count() == 1
    assert chat.page.is_hidden("#columns .column-head")
    chat.page.check("#colour-tokens")
    chat.set(max_new_tokens=10, **SAMPLING)
    chat.send("Hi")
    answer = chat.wait_answer()
    assert all("adapter_id" not in r["parameters"] for r in chat.requests)
    generated = int(re.match(r"(\d+) tokens", answer["stats"]).group(1))
    records = chat.page.evaluate("window.tinycloudChat.state.columns[0].messages[1].tokens")
    shown = chat.page.eval_on_selector_all("#log .tok", "ts => ts.map(t => t.dataset.p)")
    assert len(records) == len(shown) == generated  # EOS included, as a special token
    assert shown == [bucket(t["logprob"]) for t in records]
    assert all(t["logprob"] is not None and t["logprob"] <= 0 for t in records)
    chat.page.focus("#log .tok")
    chat.wait("!document.getElementById('token-tip').hidden")
    if accepts_top_n_tokens(server):
        assert chat.page.locator("#token-tip .tip-alts li").count() == 5
        assert chat.page.text_content("#about-tokens").startswith("up to 5 per token")
    else:
        assert "the server sent none" in chat.page.text_content("#token-tip")
        assert (
            chat.page.text_content("#about-tokens")
            == "not sent by this server (top_n_tokens refused)"
        )
        assert [r["parameters"].get("top_n_tokens") for r in chat.requests] == [5, None]
    chat.page.screenshot(path=str(ARTIFACTS / "token-view-one-model.png"))


STREAM_SEED = 1


def test_message_streams_token_by_token(server, open_chat, tmp_path):
    chat = open_chat(server)
    chat.wait_online()
    # A long stream, so it arrives in parts; seeded, because an unseeded draw from the random
    # model may end early or hold its text back (bytes that are not yet characters) to the end.
    chat.set(max_new_tokens=120, seed=STREAM_SEED, **SAMPLING)
    # Record each state the answer's text went through, and in how many separate moments.
    chat.page.evaluate(
        """() => { window.before = []; window.moments = 0;
          new MutationObserver(records => {
            const mine = records.filter(r => r.type === 'characterData'
                                             && r.target.parentElement.closest('.assistant'));
            if (mine.length) window.moments += 1;
            for (const r of mine) window.before.push(r.oldValue);
          }).observe(document.getElementById('log'),
                     {subtree: true, characterData: true, characterDataOldValue: true}); }"""
    )
    chat.page.fill("#input", "line one")
    chat.page.press("#input", "Shift+Enter")
    chat.page.type("#input", "line two")
    assert chat.page.input_value("#input") == "line one\nline two"  # Shift+Enter: a newline
    chat.page.press("#input", "Enter")
    answer = chat.wait_answer()

    states = chat.page.evaluate("window.before")  # "", t1, t1+t2, ..., the raw whole answer
    assert len(set(states)) >= 4, states  # several distinct partial texts on the way
    assert all(b.startswith(a) for a, b in itertools.pairwise(states))  # each one grows
    assert chat.page.evaluate("window.moments") >= 2  # over time, not all in one go
    assert answer["text"].strip() != ""
    assert answer["finish"] in FINISH_REASONS
    assert re.search(r"\d+ tokens · [\d.]+ tok/s · first token \d+ ms", answer["stats"])
    assert chat.bubbles()[0] == "line one\nline two"
    # The prompt is the fine-tune's format, from /info, and the request says what the UI says.
    sent = chat.requests[-1]
    assert sent["inputs"] == expected_prompt("line one\nline two")
    assert sent["parameters"]["max_new_tokens"] == 120
    assert sent["parameters"]["do_sample"] is True
    assert sent["parameters"]["seed"] == STREAM_SEED
    assert chat.page.text_content("#last-prompt") == sent["inputs"]

    # A second turn carries the first, closed with EOS, in the trained format. (The random
    # model's answers re-tokenize long; a loaded short turn keeps both turns in 256 tokens.)
    turn = tmp_path / "turn.json"
    turn.write_text(json.dumps([{"role": "user", "content": "line one\nline two"},
                                {"role": "assistant", "content": " Hi there.\n"}]))  # fmt: skip
    chat.page.set_input_files("#load-file", str(turn))
    chat.wait("document.getElementById('log').textContent.includes('Hi there.')")
    chat.set(max_new_tokens=8)
    chat.send("and again")
    second = chat.wait_answer(2)
    assert second["finish"] in FINISH_REASONS
    f = PROMPT_FORMAT
    first_turn = f["user_prefix"] + "line one\nline two" + f["user_suffix"] + "Hi there."
    assert chat.requests[-1]["inputs"] == (
        f["system"] + f["separator"] + first_turn + "<|endoftext|>" + f["separator"]
        + f["user_prefix"] + "and again" + f["user_suffix"]
    )  # fmt: skip


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """A tiny model with an 8192-token context: room for answers that take seconds."""
    return build_tiny_model(tmp_path_factory.mktemp("long") / "model", n_positions=8192)


@pytest.fixture(scope="module")
def long_server(long_model):
    with running_server(long_model) as base:
        yield base


def test_stop_aborts_the_stream_and_reenables_the_ui(long_server, open_chat):
    """Deterministic under any load: the answer is asked for 8000 greedy tokens that never end
    (seconds of work, so it cannot arrive whole before the page reads it), and Stop is pressed
    from inside the page the moment the first token shows."""
    message = endless_message(long_server)
    chat = open_chat(long_server)
    chat.wait_online()
    chat.set(max_new_tokens=8000, temperature=0, repetition_penalty=1)
    chat.page.evaluate(
        """() => new MutationObserver((recs, obs) => {
             if (recs.some(r => r.type === 'characterData')) {
               obs.disconnect(); document.getElementById('stop').click(); }
           }).observe(document.getElementById('log'), {subtree: true, characterData: true})"""
    )
    assert chat.page.is_disabled("#stop")
    chat.send(message)
    answer = chat.wait_answer()
    assert answer["finish"] == "stopped"
    tokens = int(re.match(r"(\d+) tokens", answer["stats"]).group(1))
    assert chat.requests[-1]["parameters"]["max_new_tokens"] == 8000
    assert 1 <= tokens < 8000  # cut short
    assert chat.page.is_enabled("#send") and chat.page.is_disabled("#stop")
    assert chat.page.text_content("#notice") == "Stopped."
    # The server is free and the page works on: the next message is answered in full.
    chat.set(max_new_tokens=8)
    chat.send("Shorter, please.")
    assert chat.wait_answer(2)["finish"] in FINISH_REASONS


def accepts_top_n_tokens(base: str) -> bool:
    """Whether the server takes TGI's ``top_n_tokens`` (the native server will, issue 15)."""
    body = {"inputs": "x", "parameters": {"max_new_tokens": 1, "top_n_tokens": 1}}
    return httpx.post(f"{base}/generate", json=body, headers=_auth(), timeout=60).status_code == 200


def test_settings_persist_and_reach_the_request(server, open_chat):
    chat = open_chat(server)
    chat.wait_online()
    chat.set(
        max_new_tokens=12,
        temperature=0.3,
        top_p=0.8,
        top_k=7,
        repetition_penalty=1.3,
        top_n_tokens=3,
        seed=12345,
        stop="END\n\\n",
        system="Be brief.",
    )
    chat.page.reload()
    chat.wait_online()
    values = chat.page.eval_on_selector_all(
        "#settings input, #settings textarea", "els => els.map(e => [e.name, e.value])"
    )
    assert dict(values) == {
        "max_new_tokens": "12",
        "temperature": "0.3",
        "top_p": "0.8",
        "top_k": "7",
        "repetition_penalty": "1.3",
        "top_n_tokens": "3",
        "seed": "12345",
        "stop": "END\n\\n",
        "system": "Be brief.",
    }
    chat.send("Hi")
    chat.wait_answer()
    # The page asks for the alternatives the setting says; a server that refuses top_n_tokens
    # (TGI's 422) is asked again without them.
    assert chat.requests[0]["parameters"]["top_n_tokens"] == 3
    sent = chat.requests[-1]
    topn = {"top_n_tokens": 3} if accepts_top_n_tokens(server) else {}
    assert len(chat.requests) == (1 if topn else 2)
    assert sent["inputs"] == expected_prompt("Hi", system="Be brief.")
    assert sent["parameters"] == {
        **topn,
        "max_new_tokens": 12,
        "repetition_penalty": 1.3,
        "do_sample": True,
        "temperature": 0.3,
        "top_p": 0.8,
        "top_k": 7,
        "seed": 12345,
        "details": True,
        "stop": ["END", "\n", PROMPT_FORMAT["stop"]],
    }
    chat.page.click("#reset-settings")
    chat.page.reload()
    assert chat.page.input_value("#set-max_new_tokens") == "200"
    assert chat.page.input_value("#set-seed") == ""  # the default: a fresh draw each time
    assert chat.bubbles()[0] == "Hi"  # the conversation survives a reload too


# --- model output is text ------------------------------------------------------------------------


ELEMENTS = "document.querySelectorAll('img, script, svg, iframe, object, embed').length"


def test_xss_in_a_loaded_conversation_and_a_message_stays_text(server, open_chat, tmp_path):
    chat = open_chat(server)
    chat.wait_online()
    before = chat.page.evaluate(ELEMENTS)
    convo = tmp_path / "xss.json"
    messages = [{"role": r, "content": x} for x in XSS for r in ("user", "assistant")]
    convo.write_text(json.dumps({"messages": messages}))
    chat.page.set_input_files("#load-file", str(convo))
    chat.wait(f"document.querySelectorAll('#log .msg').length === {len(XSS) * 2}")
    chat.set(max_new_tokens=6, **SAMPLING)
    chat.send(XSS[0])  # the user's own text, and a real answer after it
    chat.wait_answer(len(XSS) + 1)
    assert chat.bubbles()[: len(XSS) * 2 + 1] == [m["content"] for m in messages] + [XSS[0]]
    assert chat.page.evaluate(ELEMENTS) == before
    assert chat.dialogs == []
    f = PROMPT_FORMAT  # the user's text went to the model as text
    assert chat.requests[-1]["inputs"].endswith(f["user_prefix"] + XSS[0] + f["user_suffix"])


def test_xss_in_streamed_tokens_stays_text(server, open_chat):
    """A hostile model's tokens: the real server's stream with each token's text (and the
    alternatives it weighed, in TGI's top_tokens) swapped for pieces of markup, split across
    events and with CRLF line ends, as the page receives it; shown as text, then as tokens."""
    pieces = "".join(XSS)

    def tamper(route):
        response = route.fetch()
        if response.status != 200:  # e.g. the 422 of a server without top_n_tokens: as it is
            route.fulfill(response=response)
            return
        events = [json.loads(x) for x in re.findall(r"^data:(.*)$", response.text(), re.M)]
        assert events
        chunks = [pieces[i : i + 5] for i in range(0, len(pieces), 5)]
        out = []
        for i, chunk in enumerate(chunks):
            ev = dict(events[min(i, len(events) - 1)], generated_text=None, details=None)
            ev["token"] = {**ev["token"], "text": chunk, "special": False}
            alt = {"id": 1, "text": XSS[i % len(XSS)], "logprob": -1.5, "special": False}
            ev["top_tokens"] = [{**ev["token"], "logprob": -0.5}, alt]
            out.append(ev)
        out[-1] = {**out[-1], "generated_text": pieces, "details": events[-1]["details"]}
        sse = "".join(f"data:{json.dumps(e)}\r\n\r\n" for e in out)
        route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream", "Access-Control-Allow-Origin": "null"},
            body=sse,
        )

    chat = open_chat(server)
    chat.wait_online()
    chat.page.route("**/generate_stream", tamper)
    before = chat.page.evaluate(ELEMENTS)
    chat.set(max_new_tokens=4, **SAMPLING)
    chat.send("Say something nasty.")
    answer = chat.wait_answer()
    assert answer["text"] == pieces
    assert chat.page.evaluate(ELEMENTS) == before
    chat.page.check("#show-tokens")  # the same answer as tokens, and the tip of one
    assert chat.page.text_content("#log .assistant .bubble") == pieces
    assert chat.page.locator("#log .assistant .tok").count() == -(-len(pieces) // 5)
    chat.page.focus("#log .assistant .tok")
    chat.wait("!document.getElementById('token-tip').hidden")
    tip = chat.page.text_content("#token-tip")
    assert "“" + pieces[:5] + "”" in tip and "“" + XSS[0] + "”" in tip
    assert chat.page.evaluate(ELEMENTS) == before
    chat.page.wait_for_timeout(100)
    assert chat.dialogs == []


def test_controls_are_labelled_and_reachable_by_keyboard(open_chat):
    chat = open_chat(f"http://127.0.0.1:{free_port()}")
    unnamed = chat.page.evaluate(
        """() => [...document.querySelectorAll('input, textarea, button, summary')]
              .filter(e => !((e.labels && e.labels.length) || e.getAttribute('aria-label')
                             || e.textContent.trim()))
              .map(e => e.outerHTML)"""
    )
    assert unnamed == []
    assert chat.page.get_attribute("#log", "aria-live") == "polite"
    assert chat.page.get_attribute("#error", "role") == "alert"
    page = chat.page
    first = "document.querySelector('a[href], button, input, textarea, summary').className"
    assert page.evaluate(first) == "skip"  # the first stop in the tab order
    page.focus(".skip")
    page.keyboard.press("Enter")  # ... lands in the message box
    assert page.evaluate("document.activeElement.id") == "input"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"


def test_csp_blocks_injected_script_and_other_hosts(open_chat):
    """Defence in depth: even markup that got into the page could not run or phone home."""
    chat = open_chat(f"http://127.0.0.1:{free_port()}")
    result = chat.page.evaluate(
        """async () => {
          const violations = [];
          document.addEventListener('securitypolicyviolation',
                                    e => violations.push(e.effectiveDirective));
          const s = document.createElement('script');
          s.textContent = 'window.ran = true';
          document.body.append(s);
          const box = document.createElement('div');
          box.innerHTML = '<img src="x" onerror="window.ran = true">';
          document.body.append(box);
          let fetched = true;
          try { await fetch('http://127.0.0.2:9/steal'); } catch (e) { fetched = false; }
          await new Promise(r => setTimeout(r, 100));
          box.remove();
          return {ran: window.ran === true, fetched, violations};
        }"""
    )
    assert result["ran"] is False and result["fetched"] is False
    assert {"script-src-elem", "connect-src"} <= set(result["violations"]), result


# --- the server's own words for errors ---------------------------------------------------------


def _server_error(base: str, body: dict, key: str = API_KEY) -> tuple[int, str]:
    res = httpx.post(f"{base}/generate_stream", json=body, headers=_auth(key))
    assert res.status_code >= 400, f"expected an error, got {res.status_code}: {res.text[:200]}"
    return res.status_code, res.json()["error"]


def test_wrong_api_key_shows_the_401_message(server, open_chat, tmp_path):
    status, message = _server_error(server, {"inputs": "x"}, key="wrong-key")
    assert status == 401
    chat = open_chat(server, api_key="wrong-key")
    # On load: /health is open, /info is not; the header says the key is the trouble.
    chat.page.wait_for_selector('#health[data-state="down"]')
    assert chat.page.text_content("#health-text") == "online, but the key was refused"
    assert f"/info): The server answered 401 (authentication): {message}" in chat.page.text_content(
        "#error"
    )
    chat.send("Hello?")
    chat.wait("document.getElementById('error').textContent.startsWith('The server answered 401')")
    shown = chat.page.text_content("#error")
    assert shown.startswith(f"The server answered 401 (authentication): {message}\n")
    assert "API key" in shown
    assert chat.page.input_value("#input") == "Hello?"  # the message is given back, not lost
    assert chat.page.eval_on_selector_all("#log .msg", "els => els.length") == 0
    # A failed Regenerate puts the old answer back.
    convo = tmp_path / "convo.json"
    convo.write_text(
        json.dumps([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    )
    chat.page.set_input_files("#load-file", str(convo))
    chat.wait("document.querySelectorAll('#log .msg').length === 2")
    chat.page.click("#regenerate")
    chat.wait("document.getElementById('send').disabled === false")
    assert chat.bubbles() == ["Q", "A"]
    assert chat.page.text_content("#error").startswith("The server answered 401")


def test_invalid_setting_shows_the_422_message(server, open_chat):
    chat = open_chat(server)
    chat.wait_online()
    chat.set(top_p=1.5, max_new_tokens=8)
    chat.page.reload()  # saved as typed, and sent as saved
    chat.wait_online()
    chat.send("Hello")
    chat.wait("document.getElementById('error').textContent.includes('422')")
    sent = chat.requests[-1]
    assert sent["parameters"]["top_p"] == 1.5
    status, message = _server_error(server, sent)
    assert status == 422
    assert message in chat.page.text_content("#error")
    assert chat.page.is_enabled("#send")


@pytest.fixture(scope="module")
def busy_server(long_model):
    """One slot and no queue, on a tiny model with a long context: a single long greedy
    generation keeps it busy for seconds, so the next request gets the server's 429."""
    with running_server(long_model, "--max-batch-size", "1", "--max-queued", "0") as base:
        yield base


def _endless_prompt(base: str) -> str:
    """A prompt the random model answers greedily without reaching EOS: greedy output falls
    into a loop, and one whose loop holds no EOS runs to max_new_tokens."""
    for prompt in ("hold", "wait", "busy", "the", "a b c", "zz"):
        params = {"max_new_tokens": 300, "do_sample": False, "details": True}
        res = httpx.post(f"{base}/generate", json={"inputs": prompt, "parameters": params},
                         headers=_auth(), timeout=60)  # fmt: skip
        if res.json()["details"]["finish_reason"] == "length":
            return prompt
    pytest.fail("every prompt reached EOS on the random model: change busy_server's seed")


def test_busy_server_shows_the_429_message(busy_server, open_chat):
    chat = open_chat(busy_server)
    chat.wait_online()
    params = {"max_new_tokens": 8000, "do_sample": False}  # seconds of work for the one slot
    hold = {"inputs": _endless_prompt(busy_server), "parameters": params}
    url = f"{busy_server}/generate_stream"
    with httpx.stream("POST", url, json=hold, headers=_auth(), timeout=120) as held:
        assert held.status_code == 200, held.read()
        lines = held.iter_lines()  # kept: a dropped iterator closes the stream, freeing the slot
        next(lines)  # its first token has come: the one slot is taken
        status, message = _server_error(busy_server, {"inputs": "x"})  # the server's own words
        assert status == 429
        chat.send("Hello?")
        chat.wait("document.getElementById('error').textContent.includes('429')")
    shown = chat.page.text_content("#error")
    assert shown.startswith("The server answered 429") and message in shown
    assert f"The server is busy; try again in {C.RETRY_AFTER_S} s." in shown  # Retry-After
    assert chat.page.input_value("#input") == "Hello?"  # the message is given back
    assert chat.page.is_enabled("#send")
    assert chat.page.eval_on_selector_all("#log .msg", "els => els.length") == 0


def test_unreachable_server_is_named(open_chat):
    dead = f"http://127.0.0.1:{free_port()}"
    chat = open_chat(dead)
    chat.page.wait_for_selector('#health[data-state="down"]')
    assert chat.page.text_content("#health-text") == "unreachable"
    chat.send("anyone there?")
    chat.wait("document.getElementById('send').disabled === false")
    shown = chat.page.text_content("#error")
    assert f"Cannot reach the server at {dead}" in shown
    assert "--cors-origin" in shown


# --- context budget, export/load, regenerate ---------------------------------------------------


def test_old_turns_are_dropped_to_fit_the_context(server, open_chat, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    info = httpx.get(f"{server}/info", headers=_auth()).json()
    chat = open_chat(server)
    chat.wait_online()
    turns = []
    for i in range(4):
        turns += [
            {"role": "user", "content": f"old question {i} " + "words " * 40},
            {"role": "assistant", "content": f"old answer {i} " + "more " * 40},
        ]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(turns))  # a bare list of messages loads too
    chat.page.set_input_files("#load-file", str(path))
    chat.set(max_new_tokens=64, **SAMPLING)
    chat.send("the newest question")
    answer = chat.wait_answer(5)
    assert answer["finish"] in FINISH_REASONS  # no 422: it fitted
    assert re.search(r"\d+ older turns? left out to fit", answer["stats"])
    sent = chat.requests[-1]["inputs"]
    assert "old question 0" not in sent
    f = PROMPT_FORMAT
    assert sent.endswith(f["user_prefix"] + "the newest question" + f["user_suffix"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer(sent)["input_ids"]) + 64 <= info["max_total_tokens"]


def test_answer_is_capped_to_the_room_left(server, open_chat):
    """Max new tokens near the whole context: the page learns the prompt's real size from the
    server (its 422, or /tokenize) and caps the answer to fit instead of failing."""
    info = httpx.get(f"{server}/info", headers=_auth()).json()
    chat = open_chat(server)
    chat.wait_online()
    chat.set(max_new_tokens=info["max_total_tokens"] - 10, **SAMPLING)
    chat.send("A question that leaves little room.")
    answer = chat.wait_answer()
    assert chat.page.text_content("#error") == ""
    capped = int(re.search(r"answer capped at (\d+) tokens to fit", answer["stats"]).group(1))
    sent = chat.requests[-1]
    assert sent["parameters"]["max_new_tokens"] == capped < info["max_total_tokens"] - 10
    assert answer["finish"] in FINISH_REASONS


def test_export_clear_load_and_regenerate(server, open_chat, tmp_path):
    chat = open_chat(server)
    chat.context.grant_permissions(["clipboard-read", "clipboard-write"])
    chat.wait_online()
    chat.set(max_new_tokens=6, seed=7, **SAMPLING)  # seeded: Regenerate gives the same answer
    chat.send('first ✓ "quoted"')
    first = chat.wait_answer()
    chat.page.click("#log .assistant .copy")
    assert chat.page.evaluate("() => navigator.clipboard.readText()") == first["text"]
    with chat.page.expect_download() as dl:
        chat.page.click("#export")
    exported = json.loads(Path(dl.value.path()).read_text())
    assert exported["format"] == "tinycloud-chat"
    assert [m["content"] for m in exported["messages"]] == ['first ✓ "quoted"', first["text"]]
    assert exported["messages"][1]["meta"]["finish_reason"] == first["finish"]
    assert exported["settings"]["seed"] == 7  # the export says how to draw the answer again
    assert API_KEY not in json.dumps(exported)

    chat.page.click("#clear")
    assert chat.bubbles() == []
    chat.page.click("#undo")
    assert chat.bubbles() == ['first ✓ "quoted"', first["text"]]
    chat.page.click("#clear")
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(exported))
    chat.page.set_input_files("#load-file", str(saved))
    chat.wait("document.querySelectorAll('#log .msg').length === 2")
    assert chat.bubbles() == ['first ✓ "quoted"', first["text"]]

    n = len(chat.requests)
    chat.page.click("#regenerate")
    again = chat.wait_answer()
    assert len(chat.requests) == n + 1
    assert chat.requests[-1]["inputs"] == chat.requests[0]["inputs"]  # the same question again
    assert again["finish"] in FINISH_REASONS and len(chat.bubbles()) == 2
    assert chat.requests[-1]["parameters"]["seed"] == 7
    assert again["text"] == first["text"]  # the same seed, settings and model: the same answer

    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps({"instruction": "Name a color.", "input": "warm"}))
    chat.page.set_input_files("#load-file", str(prompt))
    chat.wait("document.getElementById('input').value !== ''")
    assert chat.page.input_value("#input") == "Name a color.\n\nwarm"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    chat.page.set_input_files("#load-file", str(bad))
    chat.wait("document.getElementById('error').textContent !== ''")
    assert "Could not load bad.json" in chat.page.text_content("#error")
    assert len(chat.bubbles()) == 2  # nothing lost


# --- SSE parsing, with the page's own parser ---------------------------------------------------


def test_sse_parser_handles_any_chunking(open_chat):
    chat = open_chat(f"http://127.0.0.1:{free_port()}")
    stream = (
        ': keep-alive\r\n\r\ndata:{"token":{"text":"a"}}\r\n\r\n'
        'data: {"token":{"text":"b\\r\\n"}}\n\nevent: x\ndata: 1\ndata: 2\r\r'
        'data:{"generated_text":"ab"}\n\n'
    )
    events = chat.page.evaluate(
        """stream => {
          const run = (chunks) => { const out = [];
            const p = window.tinycloudChat.createSSEParser(e => out.push(e));
            for (const c of chunks) p.push(c); p.end(); return JSON.stringify(out); };
          const whole = run([stream]);
          for (let i = 0; i <= stream.length; i++)
            for (let j = i; j <= stream.length; j += 7) {
              const got = run([stream.slice(0, i), stream.slice(i, j), stream.slice(j)]);
              if (got !== whole) return {i, j, got, whole};
            }
          if (run([...stream]) !== whole) return {oneByOne: run([...stream])};
          return JSON.parse(whole); }""",
        stream,
    )
    assert events == [
        {"event": "message", "data": '{"token":{"text":"a"}}'},
        {"event": "message", "data": '{"token":{"text":"b\\r\\n"}}'},
        {"event": "x", "data": "1\n2"},
        {"event": "message", "data": '{"generated_text":"ab"}'},
    ]


def test_page_prompt_matches_the_models_chat_template(open_chat, tiny_model_dir):
    """The page's multi-turn prompt is exactly what the fine-tune's chat template renders."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = open_chat(f"http://127.0.0.1:{free_port()}")  # no server: the rendered-in format
    history = [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": 'And another, with "quotes" & ünïcode?'},
        {"role": "assistant", "content": "Eleven 🙂"},
    ]
    newest = "One more."
    for system in (None, "You are terse."):
        page_prompt = chat.page.evaluate(
            """([history, newest, system]) => { const c = window.tinycloudChat;
                 const f = c.promptFormat();
                 return [f.source, c.buildPrompt(f.format, system || f.format.system,
                                                 c.pairTurns(history), newest)]; }""",
            [history, newest, system],
        )
        messages = [{"role": "system", "content": system}] if system else []
        messages += [*history, {"role": "user", "content": newest}]
        assert page_prompt == [
            "rendered into this page",
            tokenizer.apply_chat_template(messages, tokenize=False),
        ]


# --- how it looks -------------------------------------------------------------------------------


def test_screenshots_desktop_and_phone(server, open_chat):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    chat = open_chat(server)
    chat.wait_online()
    chat.set(max_new_tokens=30, **SAMPLING)
    chat.send("What does a tokenizer do?")
    chat.wait_answer()
    chat.send("<b>Is this bold?</b> 🙂")
    chat.wait_answer(2)
    chat.page.screenshot(path=str(ARTIFACTS / "chat-desktop.png"))

    phone = open_chat(server, viewport={"width": 390, "height": 844}, name="phone.html")
    phone.wait_online()
    assert phone.page.evaluate("document.getElementById('settings-box').open") is False
    phone.page.click("#settings-title")  # folded away on a phone; open it to change settings
    phone.set(max_new_tokens=20, **SAMPLING)
    phone.page.click("#settings-title")
    phone.send("Hello from a phone")
    phone.wait_answer()
    phone.page.screenshot(path=str(ARTIFACTS / "chat-phone.png"))
    width = phone.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # no sideways scrolling
    for sel in ("#input", "#send", "#stop"):
        box = phone.page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, sel
    assert (ARTIFACTS / "chat-desktop.png").stat().st_size > 10_000
