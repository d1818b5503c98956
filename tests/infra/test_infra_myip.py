"""infra/myip.py against a real HTTP server on loopback standing in for checkip.amazonaws.com."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from infra.myip import IpLookupError, current_public_ip


class CheckIp(BaseHTTPRequestHandler):
    body = b"52.94.76.10\n"
    delay_s = 0.0

    def do_GET(self) -> None:
        time.sleep(self.delay_s)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(self.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting: that is what the timeout test wants

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def checkip() -> Iterator[tuple[str, type[CheckIp]]]:
    handler = type("Handler", (CheckIp,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler
    finally:
        server.shutdown()
        server.server_close()


def test_answer_is_the_public_address(checkip):
    url, _ = checkip
    assert current_public_ip(url) == "52.94.76.10"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>rate limited</html>", "not an IP address"),
        (b"10.1.2.3", "not a public address"),
        (b"", "not an IP address"),
    ],
)
def test_odd_answers_are_errors(checkip, body, message):
    url, handler = checkip
    handler.body = body
    with pytest.raises(IpLookupError, match=message):
        current_public_ip(url)


def test_slow_service_times_out_quickly(checkip):
    url, handler = checkip
    handler.delay_s = 1.0
    started = time.monotonic()
    with pytest.raises(IpLookupError, match=r"could not be reached \(timed out; timeout 0\.2s\)"):
        current_public_ip(url, timeout=0.2)
    assert time.monotonic() - started < 1.0


def test_nothing_listening_is_an_error(port):
    with pytest.raises(IpLookupError, match="could not be reached"):
        current_public_ip(f"http://127.0.0.1:{port}/", timeout=1)
