// The conversation's elements. Model and server text only ever goes in as text (textContent, text
// nodes), never as markup: a reply that holds a tag shows the tag.
(function (exports, tokenview) {
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

  // An answer's bubble shows its text, or, in the token view, its tokens as generated (special
  // tokens and a stop sequence included) when it has them.
  function fillBubble(bubble, msg, showTokens) {
    const asTokens = showTokens && msg.role === "assistant" && Array.isArray(msg.tokens);
    bubble.replaceChildren();
    bubble.dataset.view = asTokens ? "tokens" : "text";
    if (asTokens) {
      bubble.setAttribute("role", "group");
      bubble.setAttribute("aria-label", "The answer's tokens: arrow keys move between them");
      tokenview.fillTokens(bubble, msg.tokens);
      return null;
    }
    bubble.removeAttribute("role");
    bubble.removeAttribute("aria-label");
    const text = document.createTextNode(msg.content);
    bubble.append(text);
    return text;
  }

  // One message's list item; the returned view appends streamed text (or, in the token view,
  // tokens) to it in place. `showTokens`: start in the token view.
  function messageView(msg, { showTokens = false, who } = {}) {
    const li = el("li", { class: "msg " + msg.role });
    li.append(el("div", { class: "who" }, who || (msg.role === "user" ? "You" : "Model")));
    const bubble = el("div", { class: "bubble", dir: "auto" });
    let text = fillBubble(bubble, msg, showTokens);
    li.append(bubble);
    const foot = el("div", { class: "foot" });
    const meta = el("span", { class: "stats" });
    const copy = el("button", { type: "button", class: "linkish copy" }, "Copy");
    copy.setAttribute("aria-label", msg.role === "user" ? "Copy your message" : "Copy the answer");
    copy.addEventListener("click", () => copyText(msg.content, copy));
    foot.append(meta, copy);
    li.append(foot);
    const view = {
      li,
      // Streamed text `t` of token record `tok` (tok: null for none).
      append(t, tok) {
        if (text) text.appendData(t);
        else if (tok) tokenview.appendToken(bubble, tok);
      },
      set(t) {
        if (text) text.data = t;
      },
      meta(m) { renderMeta(foot, meta, m); },
      setTokenView(on) { text = fillBubble(bubble, msg, on); },
    };
    if (msg.meta) view.meta(msg.meta);
    return view;
  }

  // One column of compare mode: a header naming its model, with its own Regenerate and Stop,
  // over the conversation with that model. With a single column on the server's own model the
  // header is hidden and the page looks as it always has. The first column's list is #log.
  function columnView(index, { onRegenerate, onStop }) {
    const section = el("section", { class: "column", "data-index": String(index) });
    const head = el("div", { class: "column-head" });
    const title = el("h2", { class: "column-title", id: `column-title-${index}` });
    const badge = el("span", { class: "column-badge" });
    const regen = el("button", { type: "button", class: "linkish column-regenerate" }, "Regenerate");
    const stop = el("button", { type: "button", class: "linkish column-stop", disabled: "" }, "Stop");
    regen.addEventListener("click", onRegenerate);
    stop.addEventListener("click", onStop);
    head.append(title, badge, regen, stop);
    const log = el("ol", { class: "log", role: "log", "aria-live": "polite", "aria-relevant": "additions text" });
    if (index === 0) log.id = "log";
    section.append(head, log);
    return {
      section, head, log, regen, stop,
      // `name`: the model's; `alone`: the only column, on the server's own model; `note`: why
      // the column cannot be asked ("" when it can).
      label(name, alone, note) {
        head.hidden = alone;
        title.textContent = name;
        badge.textContent = note;
        badge.hidden = !note;
        section.classList.toggle("unserved", Boolean(note));
        if (alone) log.setAttribute("aria-label", "Conversation");
        else log.setAttribute("aria-label", `Conversation with ${name}`);
        regen.setAttribute("aria-label", `Regenerate the last answer of ${name}`);
        stop.setAttribute("aria-label", `Stop ${name}'s answer`);
      },
    };
  }

  exports.el = el;
  exports.columnView = columnView;
  exports.metaText = metaText;
  exports.messageView = messageView;
})(...(typeof tinycloud === "object"
  ? [(tinycloud.view = {}), tinycloud.tokenview]
  : [module.exports, require("./tokenview.js")]));
