// The token view: an answer as its tokens, each one focusable (hover, focus or tap) to show what
// the model weighed there. Text goes in as text only (textContent); styling is by class and
// data attributes the page's own style sheet knows, and the tip is placed through the CSSOM,
// which the page's Content-Security-Policy allows (a style attribute in markup it would not).
//
// One answer's tokens are a single stop in the tab order (a roving tabindex): Tab reaches the
// answer, the arrow keys, Home and End move between its tokens, Esc hides the tip.
(function (exports, tokens) {
  "use strict";

  const records = new WeakMap(); // token element -> its token record

  function tokenNode(tok) {
    const node = document.createElement("span");
    node.className = tok.special ? "tok special" : "tok";
    node.textContent = tok.text;
    node.tabIndex = -1;
    node.setAttribute("role", "button");
    node.setAttribute("aria-label", tokens.tokenLabel(tok));
    const bucket = tokens.bucketOf(tokens.probability(tok.logprob));
    node.dataset.p = bucket < 0 ? "none" : String(bucket);
    // Whitespace and empty tokens get a visible mark (by style, not text) so they can be pointed
    // at: an empty one is part of a character split across tokens, its text in the next.
    if (tok.text === "") node.dataset.ws = "empty";
    else if (tok.text.trim() === "") node.dataset.ws = tok.text.includes("\n") ? "newline" : "space";
    records.set(node, tok);
    return node;
  }

  function appendToken(container, tok) {
    const node = tokenNode(tok);
    if (!container.querySelector(".tok")) node.tabIndex = 0;
    container.append(node);
    return node;
  }

  function fillTokens(container, list) {
    container.replaceChildren();
    for (const tok of list) appendToken(container, tok);
  }

  function recordOf(node) {
    return records.get(node) || null;
  }

  // ---- the tip ------------------------------------------------------------------------------
  function line(tag, cls, text) {
    const node = document.createElement(tag);
    node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function rankText(tok) {
    if (!tok.top.length) return "";
    const rank = tokens.rankOf(tok);
    return rank ? `choice ${rank} of ${tok.top.length}` : `not among the top ${tok.top.length}`;
  }

  // The tip's contents for one token: its text, probability and rank, then the alternatives.
  function fillTip(tip, tok) {
    const head = line("p", "tip-head");
    head.append(line("span", "tip-text", tokens.showText(tok.text)),
      line("span", "tip-p", tokens.formatProbability(tokens.probability(tok.logprob))));
    const rank = rankText(tok);
    if (rank) head.append(line("span", "tip-rank", rank));
    tip.replaceChildren(head);
    if (!tok.top.length) {
      tip.append(line("p", "tip-note", "No alternatives for this token: the server sent none (top_n_tokens)."));
      return;
    }
    const list = line("ol", "tip-alts");
    const rank1 = tokens.rankOf(tok);
    tok.top.forEach((alt, i) => {
      const p = tokens.probability(alt.logprob);
      const item = line("li", i + 1 === rank1 ? "chosen" : "");
      const meter = document.createElement("meter");
      meter.min = 0;
      meter.max = 1;
      meter.value = p ?? 0;
      item.append(line("span", "alt-text", tokens.showText(alt.text)), meter,
        line("span", "alt-p", tokens.formatProbability(p)));
      list.append(item);
    });
    tip.append(list);
  }

  function place(tip, node) {
    const r = node.getBoundingClientRect();
    const width = tip.offsetWidth;
    const height = tip.offsetHeight;
    const left = Math.max(4, Math.min(r.left, window.innerWidth - width - 4));
    const below = r.bottom + 6 + height <= window.innerHeight;
    tip.style.left = left + "px";
    tip.style.top = (below ? r.bottom + 6 : Math.max(4, r.top - height - 6)) + "px";
  }

  // Wires the token view's events on `root` (delegated, so streamed tokens need nothing more).
  // `tip`: the page's one tip element.
  function install(root, tip) {
    let current = null;
    const show = (node) => {
      const tok = recordOf(node);
      if (!tok) return;
      if (current) current.classList.remove("inspected");
      current = node;
      node.classList.add("inspected");
      fillTip(tip, tok);
      tip.hidden = false;
      place(tip, node);
    };
    const hide = () => {
      if (current) current.classList.remove("inspected");
      current = null;
      tip.hidden = true;
    };
    const tokenAt = (e) => (e.target instanceof Element ? e.target.closest(".tok") : null);

    root.addEventListener("mouseover", (e) => {
      const node = tokenAt(e);
      if (node) show(node);
    });
    root.addEventListener("mouseout", (e) => {
      const node = tokenAt(e);
      if (node && node === current && document.activeElement !== node) hide();
    });
    root.addEventListener("focusin", (e) => {
      const node = tokenAt(e);
      if (node) show(node);
    });
    root.addEventListener("focusout", (e) => {
      if (tokenAt(e) === current) hide();
    });
    root.addEventListener("click", (e) => {
      const node = tokenAt(e);
      if (node) node.focus(); // a tap: focus shows the tip, and it stays until focus moves on
    });
    root.addEventListener("keydown", (e) => {
      const node = tokenAt(e);
      if (!node) return;
      if (e.key === "Escape" && current) {
        hide();
        e.stopPropagation(); // the page's Esc stops a stream; this one only closes the tip
        return;
      }
      const all = [...node.parentElement.querySelectorAll(".tok")];
      const i = all.indexOf(node);
      const to = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: all.length - 1 }[e.key];
      if (to === undefined || !all[to]) return;
      e.preventDefault();
      node.tabIndex = -1;
      all[to].tabIndex = 0;
      all[to].focus();
    });
    // The tip follows its token when the answer scrolls (it does while streaming).
    const follow = () => {
      if (current && current.isConnected) place(tip, current);
      else if (current) hide();
    };
    window.addEventListener("resize", follow);
    root.addEventListener("scroll", follow, true);
    return { show, hide };
  }

  exports.appendToken = appendToken;
  exports.fillTokens = fillTokens;
  exports.install = install;
})(...(typeof tinycloud === "object"
  ? [(tinycloud.tokenview = {}), tinycloud.tokens]
  : [module.exports, require("./tokens.js")]));
