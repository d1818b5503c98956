"""Render the chat page for a server and write it to a file.

    python -m web --url http://HOST:8080 --out chat.html
    TINYCLOUD_API_KEY=... python -m web --url http://HOST:8080 \
        --prompt-format runs/<run>/model/prompt_format.json --out chat.html

Open the file in a browser (it works from disk, offline). A page with an API key in it is
written readable by its owner only, since the key is in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from web.render import normalize_url, render_chat_page


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m web", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server's base URL, e.g. http://HOST:8080")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("TINYCLOUD_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $TINYCLOUD_API_KEY)",
    )
    p.add_argument(
        "--prompt-format",
        metavar="FILE",
        type=Path,
        help="the model's prompt_format.json; used when the server's /info has none",
    )
    p.add_argument(
        "--out", metavar="FILE", type=Path, default=Path("chat.html"), help="where to write it"
    )
    return p.parse_args(argv)


def write_private(path: Path, text: str, secret: bool) -> None:
    """Write atomically (a reader never sees half a page); 0600 when the page holds a key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600 if secret else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_prompt_format(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{path} does not exist. Pass the prompt_format.json from the model directory"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        html = render_chat_page(args.url, args.api_key, load_prompt_format(args.prompt_format))
        write_private(args.out, html, secret=bool(args.api_key))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    key = "with its API key (readable by you only)" if args.api_key else "without an API key"
    print(f"wrote {args.out} for {normalize_url(args.url)}, {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
