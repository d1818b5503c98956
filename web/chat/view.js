// The conversation's elements. Model and server text only ever goes in as text (textContent, text
// nodes), never as markup: a reply that holds a tag shows the tag.
(function (exports) {
  "use strict";

  function el(tag, attrs = {}, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // An answer's footer line: tokens, speed, time to the first token, what was cut to fit.
  function metaText(m) {
    const parts = [];
    if (m.tokens !== undefined) parts.push(`${m.tokens} tokens`);
    if (m.tokens_per_s) parts.push(`${m.tokens_per_s.toFixed(1)} tok/s`);
    if (m.first_token_ms !== undefined) parts.push(`first token ${Math.round(m.first_token_ms)} ms`);
    if (m.dropped) parts.push(`${m.dropped} older turn${m.dropped > 1 ? "s" : ""} left out to fit`);
    if (m.shortened_to) parts.push(`answer capped at ${m.shortened_to} tokens to fit`);
    return parts.join(" · ");
  }

  function renderMeta(foot, meta, m) {
    meta.textContent = metaText(m);
    let badge = foot.querySelector(".finish");
    if (m.finish_reason) {
      if (!badge) {
        badge = el("span", { class: "finish" });
        foot.insertBefore(badge, meta);
      }
      badge.dataset.reason = m.finish_reason;
      badge.textContent = m.finish_reason;
      badge.title = "finish reason";
    }
  }

  async function copyText(text, button) {
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch {
      const area = el("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      try {
        ok = document.execCommand("copy");
      } catch {
        ok = false;
      }
      area.remove();
    }
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => {
      button.textContent = "Copy";
    }, 1500);
  }

  // One message's list item; the returned view appends streamed text to it in place.
  function messageView(msg) {
    const li = el("li", { class: "msg " + msg.role });
    li.append(el("div", { class: "who" }, msg.role === "user" ? "You" : "Model"));
    const bubble = el("div", { class: "bubble", dir: "auto" });
    const text = document.createTextNode(msg.content);
    bubble.append(text);
    li.append(bubble);
    const foot = el("div", { class: "foot" });
    const meta = el("span", { class: "stats" });
    const copy = el("button", { type: "button", class: "linkish copy" }, "Copy");
    copy.setAttribute("aria-label", msg.role === "user" ? "Copy your message" : "Copy the answer");
    copy.addEventListener("click", () => copyText(msg.content, copy));
    foot.append(meta, copy);
    li.append(foot);
    const view = {
      li, text,
      append(t) { text.appendData(t); },
      set(t) { text.data = t; },
      meta(m) { renderMeta(foot, meta, m); },
    };
    if (msg.meta) view.meta(msg.meta);
    return view;
  }

  exports.el = el;
  exports.metaText = metaText;
  exports.messageView = messageView;
})(typeof tinycloud === "object" ? (tinycloud.view = {}) : module.exports);
