"""web.render and `python -m web`: every value encoded for its context, nothing fetched from
anywhere but the server the page was rendered for."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from remote.jobs.prompts import PROMPT_FORMAT
from web import render
from web.render import normalize_url, render_chat_page

ROOT = Path(__file__).resolve().parents[2]
NASTY_KEY = "k\"'</script><script>alert(1)</script>&<!--é☃🙂\u2028"


class _Page(HTMLParser):
    """Collects what the browser would see: tags with attributes, script bodies, title text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.title = ""
        self._in: str | None = None
        self._attrs: dict[str, str | None] = {}

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "title"):
            self._in, self._attrs = tag, dict(attrs)
            if tag == "script":
                self.scripts.append((self._attrs, ""))

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "script":
            attrs, body = self.scripts[-1]
            self.scripts[-1] = (attrs, body + data)
        elif self._in == "title":
            self.title += data


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def config_of(page: _Page) -> dict:
    blocks = [body for attrs, body in page.scripts if attrs.get("id") == "tinycloud-config"]
    assert len(blocks) == 1
    return json.loads(blocks[0])


def test_values_round_trip_through_the_json_block():
    fmt = {**PROMPT_FORMAT, "eos": "<|endoftext|>", "system": "Say </script> & 'hi' ☃"}
    html = render_chat_page("http://127.0.0.1:8080/", NASTY_KEY, fmt)
    page = parse(html)
    config = config_of(page)
    assert config == {"url": "http://127.0.0.1:8080", "api_key": NASTY_KEY, "prompt_format": fmt}
    # Two scripts only: the JSON block and the page's own code; the key opened no new one.
    assert len(page.scripts) == 2
    assert html.count("</script>") == 2
    raw_block = re.search(r'id="tinycloud-config">(.*?)</script>', html, re.S).group(1)
    assert "<" not in raw_block and ">" not in raw_block and "&" not in raw_block


def test_url_is_html_escaped_in_markup():
    html = render_chat_page("http://example.com:8080/a<b>&\"'/")
    page = parse(html)
    assert page.title.endswith("http://example.com:8080/a<b>&\"'")
    assert "/a<b>" not in html  # only ever present escaped
    assert "/a&lt;b&gt;&amp;&#34;&#39;" in html
    assert config_of(page)["url"] == "http://example.com:8080/a<b>&\"'"


def test_no_key_means_null_and_no_authorization_value():
    config = config_of(parse(render_chat_page("https://chat.example.org")))
    assert config["api_key"] is None
    assert config["prompt_format"] is None


def test_nothing_external_is_loaded():
    html = render_chat_page("http://10.1.2.3:8080", "secret")
    page = parse(html)
    for tag, attrs in page.tags:
        for name in ("src", "href", "action", "data", "poster", "srcset"):
            value = attrs.get(name)
            assert value is None or value.startswith("#"), (tag, name, value)
        assert not (tag == "link" and attrs.get("rel") == "stylesheet")
    urls = set(re.findall(r"https?://[^\s\"'<>);]+", html))
    assert urls == {"http://10.1.2.3:8080"}
    assert "@import" not in html
    assert "url(" not in html


def test_csp_allows_only_the_page_itself_and_its_server():
    html = render_chat_page("http://10.1.2.3:8080/api")
    page = parse(html)
    metas = [a for t, a in page.tags if t == "meta" and a.get("http-equiv")]
    assert len(metas) == 1
    csp = metas[0]["content"]
    assert "default-src 'none'" in csp
    assert "connect-src http://10.1.2.3:8080;" in csp
    nonce = re.search(r"'nonce-([A-Za-z0-9_-]+)'", csp).group(1)
    runnable = [a for a, _ in page.scripts if a.get("type") != "application/json"]
    assert runnable and all(a.get("nonce") == nonce for a in runnable)
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert nonce not in render_chat_page("http://10.1.2.3:8080/api")  # fresh per render


def test_page_script_never_builds_markup_or_code_from_strings():
    """Model and server text reach the DOM through textContent alone: the page's script has no
    API that parses a string as HTML or as code."""
    script = parse(render_chat_page("http://h:1")).scripts[-1][1]
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        'setTimeout("',
        "DOMParser",
        "createContextualFragment",
    ):
        assert sink not in script, sink
    assert "textContent" in script and "appendData" in script


def test_page_inlines_its_source_files_as_they_are():
    """The page's style and script are web/chat/'s files, whole and in SCRIPTS order; every script
    there is listed (a new module cannot be left out of the page)."""
    html = render_chat_page("http://h:1")
    page = parse(html)
    script = page.scripts[-1][1]
    assert {p.name for p in render.SOURCE_DIR.glob("*.js")} == set(render.SCRIPTS)
    assert render.SCRIPTS[-1] == "app.js"  # it starts the page, with every module in place
    at = [script.index((render.SOURCE_DIR / name).read_text()) for name in render.SCRIPTS]
    assert at == sorted(at)
    style = re.search(r"<style nonce=\"[^\"]+\">(.*?)</style>", html, re.S).group(1)
    assert (render.SOURCE_DIR / render.STYLE).read_text() in style
    assert "{%" not in html and "{{" not in html


@pytest.mark.parametrize(
    "name, text, found",
    [
        ("app.js", 'const s = "</SCRIPT>";\n', "</SCRIPT"),
        ("app.js", "// x\nconst s = '<!-- -->';\n", "<!--"),
        ("chat.css", "a { color: red; }\n/* </style> */\n", "</style"),
    ],
)
def test_a_source_that_would_end_its_element_is_refused(tmp_path, monkeypatch, name, text, found):
    for source in render.SOURCE_DIR.iterdir():
        (tmp_path / source.name).write_text(source.read_text())
    (tmp_path / name).write_text(text)
    monkeypatch.setattr(render, "SOURCE_DIR", tmp_path)
    line = text.count("\n", 0, text.index(found)) + 1
    with pytest.raises(ValueError, match=re.escape(f"web/chat/{name}:{line} contains {found!r}")):
        render_chat_page("http://h:1")


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "not an http(s) URL"),
        ("ec2-1-2-3-4.compute.amazonaws.com:8080", "not an http(s) URL"),
        ("javascript:alert(1)", "not an http(s) URL"),
        ("http://user:pw@host:8080", "user name or password"),
        ("http://host:8080/?x=1", "query string"),
        ("http://host:99999", "bad port"),
        ("http://ho;st:80", "characters a host name cannot have"),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        render_chat_page(url)


def test_url_normalization():
    assert normalize_url("  http://h:1/proxy/  ") == "http://h:1/proxy"
    assert normalize_url("https://[::1]:8443") == "https://[::1]:8443"
    assert "connect-src https:;" in render_chat_page("https://[::1]:8443")


def test_prompt_format_is_checked():
    with pytest.raises(ValueError, match="'eos' must be a string"):
        render_chat_page("http://h:1", prompt_format={**PROMPT_FORMAT, "eos": 5})
    with pytest.raises(ValueError, match="lacks user_suffix"):
        render_chat_page("http://h:1", prompt_format={"user_prefix": "Q: "})
    config = config_of(parse(render_chat_page("http://h:1", prompt_format={**PROMPT_FORMAT})))
    assert config["prompt_format"] == PROMPT_FORMAT


def test_cli_writes_a_private_page_and_never_prints_the_key(tmp_path):
    fmt_file = tmp_path / "prompt_format.json"
    fmt_file.write_text(json.dumps({**PROMPT_FORMAT, "eos": "<|endoftext|>"}))
    out = tmp_path / "site" / "chat.html"
    args = ["--url", "http://127.0.0.1:9/", "--prompt-format", str(fmt_file), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "web", *args, "--api-key", "s3cr3t-key"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "s3cr3t-key" not in result.stdout + result.stderr
    assert f"wrote {out}" in result.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    config = config_of(parse(out.read_text()))
    assert config["api_key"] == "s3cr3t-key"
    assert config["prompt_format"]["eos"] == "<|endoftext|>"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--url", "localhost:8080"], "not an http(s) URL"),
        (["--url", "http://h:1", "--prompt-format", "/nonexistent.json"], "does not exist"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, args, message):
    out = tmp_path / "chat.html"
    result = subprocess.run(
        [sys.executable, "-m", "web", *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_web_needs_only_jinja2_and_the_standard_library():
    """The operator renders the page without torch, FastAPI or anything of the VM's."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import web.render, web.__main__\n"
        "allowed = set(sys.stdlib_module_names) | {'web', 'jinja2', 'markupsafe'}\n"
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - allowed))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
