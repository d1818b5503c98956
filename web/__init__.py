"""The chat page: ``web.render.render_chat_page`` inlines ``chat/`` (style and scripts) into
``chat.html.j2`` and gives one self-contained HTML file.

python -m web --url http://HOST:8080 [--api-key KEY] [--prompt-format FILE.json] --out chat.html
"""
