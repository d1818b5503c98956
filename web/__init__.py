"""The chat page: ``web.render.render_chat_page`` turns ``chat.html.j2`` into one HTML file.

python -m web --url http://HOST:8080 [--api-key KEY] [--prompt-format FILE.json] --out chat.html
"""
