// The page itself: its state, what each control does, and the start-up. It runs only in the page
// (inlined last, after the modules it uses); everything it computes lives in those modules.
(function (modules) {
  "use strict";

  const { sse, api, prompt, settings, transcript, view } = modules;

  // The one place the rendered values come in: the JSON block web/render.py writes.
  const CONFIG = JSON.parse(document.getElementById("tinycloud-config").textContent);
  const BASE = CONFIG.url;
  const STORE = settings.createStore(() => window.localStorage);
  const CONVERSATION_KEY = settings.conversationKey(BASE);
  const client = api.createClient(BASE, CONFIG.api_key);
  const tokens = prompt.createTokenEstimator();
  const { el, messageView } = view;

  const $ = (id) => document.getElementById(id);
  const state = {
    messages: [], // [{role: "user"|"assistant", content, meta?}]
    busy: false,
    controller: null,
    info: null, // the server's /info, once read
    undo: null,
  };

  // ---- messages to the reader -------------------------------------------------------------
  function originName() {
    return location.origin === "null" || location.protocol === "file:"
      ? "null (a page opened from disk)" : location.origin;
  }

  function describeError(err) {
    return api.describeError(err, BASE, originName());
  }

  function showError(text) {
    const box = $("error");
    box.textContent = text;
    box.classList.toggle("shown", Boolean(text));
  }

  function notify(text, undoLabel) {
    const box = $("notice");
    box.textContent = text;
    if (undoLabel && state.undo) {
      const b = el("button", { type: "button", class: "linkish", id: "undo" }, undoLabel);
      b.addEventListener("click", () => {
        const prev = state.undo;
        state.undo = null;
        setMessages(prev);
        notify("Restored.");
      });
      box.append(b);
    }
  }

  // ---- the settings form ------------------------------------------------------------------
  // What the user typed, as typed (a bad value is kept so the server can say what is wrong).
  function readSettingsRaw() {
    const out = {};
    for (const key of Object.keys(settings.DEFAULTS)) out[key] = $("set-" + key).value;
    return out;
  }

  function readSettings() {
    return settings.parseSettings(readSettingsRaw());
  }

  function writeSettings(values) {
    for (const key of Object.keys(settings.DEFAULTS)) {
      $("set-" + key).value = values[key] ?? settings.DEFAULTS[key];
    }
  }

  function saveSettings() {
    settings.saveSettings(STORE, readSettingsRaw());
  }

  // ---- the prompt -------------------------------------------------------------------------
  function promptFormat() {
    return prompt.chooseFormat(state.info && state.info.prompt_format, CONFIG.prompt_format);
  }

  // The server's count where it has /tokenize, else the estimate.
  async function countTokens(text, signal) {
    const n = await client.tokenize(text, signal);
    return n === null ? { n: tokens.estimate(text), exact: false } : { n, exact: true };
  }

  function fitPrompt(history, newest, values, signal) {
    return prompt.fitPrompt(history, newest, values, {
      format: promptFormat().format,
      info: state.info,
      count: (text) => countTokens(text, signal),
    });
  }

  // ---- the conversation view --------------------------------------------------------------
  function render() {
    const log = $("log");
    log.replaceChildren();
    for (const m of state.messages) log.append(messageView(m).li);
    refresh();
    scrollToEnd(true);
  }

  function refresh() {
    $("empty").hidden = state.messages.length > 0;
    $("send").disabled = state.busy;
    $("stop").disabled = !state.busy;
    $("regenerate").disabled = state.busy || !state.messages.some((m) => m.role === "user");
    $("clear").disabled = state.busy || state.messages.length === 0;
    $("export").disabled = state.messages.length === 0;
    $("load-file").disabled = state.busy;
    $("log").setAttribute("aria-busy", state.busy ? "true" : "false");
  }

  function scrollToEnd(force) {
    const s = $("scroller");
    if (force || s.scrollHeight - s.scrollTop - s.clientHeight < 120) s.scrollTop = s.scrollHeight;
  }

  function setMessages(messages) {
    state.messages = messages;
    STORE.save(CONVERSATION_KEY, state.messages);
    render();
  }

  function autoGrow() {
    const t = $("input");
    t.style.height = "auto";
    t.style.height = Math.min(t.scrollHeight, window.innerHeight * 0.4) + "px";
  }

  // ---- sending and streaming --------------------------------------------------------------
  // Sends until the server takes the prompt: when our estimate was short and a 422 says by how
  // much, learn, refit and resend (twice at most).
  async function openStream(history, text, values, signal, onFit) {
    for (let attempt = 0; ; attempt += 1) {
      const fit = await fitPrompt(history, text, values, signal);
      const stops = settings.stopSequences(values, fit.format);
      onFit(fit, stops);
      $("last-prompt").textContent = fit.prompt;
      const body = { inputs: fit.prompt, parameters: settings.generationParameters(values, fit.maxNew, stops) };
      try {
        return await client.generateStream(body, signal);
      } catch (err) {
        const counted = attempt < 2 && !fit.promptTokens.exact ? api.promptTokensIn(err) : 0;
        if (!counted) throw err;
        tokens.learn(fit.prompt, counted);
      }
    }
  }

  // `restore`: the conversation to put back if nothing at all comes back (for Regenerate).
  async function send(text, restore = null) {
    text = text.trim();
    if (!text || state.busy) return;
    showError("");
    state.undo = null;
    const history = state.messages.slice();
    const user = { role: "user", content: text };
    const reply = { role: "assistant", content: "", meta: {} };
    state.messages.push(user, reply);
    $("empty").hidden = true;
    $("log").append(messageView(user).li);
    const replyView = messageView(reply);
    replyView.li.classList.add("streaming");
    $("log").append(replyView.li);
    $("input").value = "";
    autoGrow();
    scrollToEnd(true);

    const controller = new AbortController();
    state.controller = controller;
    state.busy = true;
    refresh();
    notify("Generating…");
    const started = performance.now();
    const answer = api.createAnswer();
    let firstTokenAt = 0;
    let fit = null;
    let stops = [];
    const ended = (reason, finalText, details = null) => finish(reply, replyView, {
      text: finalText, stops, started, firstTokenAt, tokens: answer.tokens, details, fit, reason,
    });
    try {
      const values = readSettings();
      const res = await openStream(history, text, values, controller.signal, (f, s) => {
        fit = f;
        stops = s;
      });
      await sse.readSSE(res, (ev) => {
        const shown = answer.take(ev);
        if (answer.tokens && !firstTokenAt) firstTokenAt = performance.now();
        if (shown) {
          reply.content += shown;
          replyView.append(shown);
          scrollToEnd(false);
        }
      });
      const details = answer.details;
      if (details && details.input_length) tokens.learn(fit.prompt, details.input_length);
      ended(
        (details && details.finish_reason) || (answer.finalText === null ? "incomplete" : "unknown"),
        answer.finalText ?? reply.content,
        details,
      );
    } catch (err) {
      if (err.name === "AbortError") {
        ended("stopped", reply.content);
      } else if (reply.content === "") {
        // Nothing came back: take the turn out again and give the message back to the composer
        // (or, for Regenerate, put the old answer back).
        if (restore) {
          state.messages = restore;
          render();
        } else {
          state.messages.splice(state.messages.indexOf(user), 2);
          replyView.li.previousSibling.remove();
          replyView.li.remove();
          $("input").value = text;
          autoGrow();
        }
        showError(describeError(err));
        notify("");
      } else {
        ended("error", reply.content);
        showError(describeError(err));
      }
    } finally {
      state.busy = false;
      state.controller = null;
      STORE.save(CONVERSATION_KEY, state.messages);
      refresh();
      controller.abort(); // no-op after a clean end; frees the connection after an error
      if (focusOnControls()) $("input").focus();
    }
  }

  // After an answer, move focus back to the message box unless the user went elsewhere meanwhile.
  function focusOnControls() {
    return !document.activeElement || document.activeElement === document.body ||
      document.activeElement === $("stop") || document.activeElement === $("send");
  }

  function finish(reply, replyView, r) {
    let text = r.text;
    for (const s of r.stops) {
      if (s && text.endsWith(s)) {
        text = text.slice(0, -s.length);
        break;
      }
    }
    reply.content = text.trim();
    replyView.set(reply.content);
    replyView.li.classList.remove("streaming");
    const end = performance.now();
    const generated = r.details && r.details.generated_tokens !== undefined ? r.details.generated_tokens : r.tokens;
    // From sending to the last token: what the reader waited, robust to tokens arriving bunched.
    const seconds = (end - r.started) / 1000;
    reply.meta = {
      tokens: generated,
      tokens_per_s: seconds > 0 && generated > 0 ? generated / seconds : 0,
      finish_reason: r.reason,
    };
    if (r.firstTokenAt) reply.meta.first_token_ms = r.firstTokenAt - r.started;
    if (r.fit && r.fit.dropped) reply.meta.dropped = r.fit.dropped;
    if (r.fit && r.fit.maxNew < r.fit.requested) reply.meta.shortened_to = r.fit.maxNew;
    replyView.meta(reply.meta);
    const rate = reply.meta.tokens_per_s ? `, ${reply.meta.tokens_per_s.toFixed(1)} tokens/s` : "";
    notify(r.reason === "stopped" ? "Stopped." : `Answer complete: ${generated} tokens${rate}, finish reason ${r.reason}.`);
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function regenerate() {
    if (state.busy) return;
    let i = state.messages.length - 1;
    while (i >= 0 && state.messages[i].role !== "user") i -= 1;
    if (i < 0) return;
    const text = state.messages[i].content;
    const before = state.messages.slice();
    state.messages = state.messages.slice(0, i);
    render();
    send(text, before);
  }

  // ---- export / load ----------------------------------------------------------------------
  function exportConversation() {
    const { format, source } = promptFormat();
    const { doc, filename } = transcript.exportDocument({
      server: BASE,
      model: state.info ? state.info.model_id || null : null,
      format, source,
      settings: readSettings(),
      messages: state.messages,
    });
    const blob = new Blob([JSON.stringify(doc, null, 2) + "\n"], { type: "application/json" });
    const a = el("a", { href: URL.createObjectURL(blob), download: filename });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    notify(`Exported ${state.messages.length} messages.`);
  }

  async function loadFile(file) {
    showError("");
    let parsed;
    try {
      parsed = transcript.interpretFile(file.name, file.type, await file.text());
    } catch (e) {
      showError(`Could not load ${file.name}: ${e.message}`);
      return;
    }
    if (parsed.messages) {
      state.undo = state.messages.length ? state.messages.slice() : null;
      if (parsed.system !== null && parsed.system !== undefined) {
        $("set-system").value = parsed.system;
        saveSettings();
      }
      setMessages(parsed.messages);
      notify(`Loaded a conversation of ${parsed.messages.length} messages from ${file.name}.`, state.undo ? "Undo" : "");
    } else {
      $("input").value = parsed.prompt;
      autoGrow();
      $("input").focus();
      notify(`Loaded a prompt from ${file.name}: review it, then send.`);
    }
  }

  function clearConversation() {
    if (state.busy || !state.messages.length) return;
    state.undo = state.messages.slice();
    setMessages([]);
    showError("");
    notify("Conversation cleared.", "Undo");
    $("input").focus();
  }

  // ---- server health and model ------------------------------------------------------------
  function setHealth(kind, text) {
    $("health").dataset.state = kind;
    $("health-text").textContent = text;
  }

  async function checkServer() {
    setHealth("checking", "Checking the server…");
    client.canTokenize = true;
    try {
      await client.health();
    } catch (e) {
      setHealth("down", e instanceof api.ServerError ? `not ready (${e.status})` : "unreachable");
      showError(describeError(e));
      return;
    }
    setHealth("up", "online");
    try {
      state.info = await client.info();
    } catch (e) {
      if (e instanceof api.ServerError && e.status === 401) setHealth("down", "online, but the key was refused");
      showError("Could not read the model's details (/info): " + describeError(e));
    }
    showAbout();
  }

  function showAbout() {
    const info = state.info || {};
    $("model-name").textContent = info.model_id || "unknown";
    $("about-context").textContent = info.max_total_tokens
      ? `${info.max_total_tokens} tokens in all, ${info.max_input_tokens ?? "?"} for the prompt`
      : "unknown (the server did not say)";
    $("about-format").textContent = promptFormat().source;
  }

  // ---- wiring -----------------------------------------------------------------------------
  function init() {
    writeSettings(settings.loadSettings(STORE));
    state.messages = transcript.restoreConversation(STORE.load(CONVERSATION_KEY, []));
    render();
    if (window.matchMedia("(max-width: 860px)").matches) $("settings-box").open = false;

    $("settings").addEventListener("input", saveSettings);
    $("settings").addEventListener("change", saveSettings);
    $("reset-settings").addEventListener("click", () => {
      writeSettings(settings.DEFAULTS);
      saveSettings();
      notify("Settings reset.");
    });
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      send($("input").value);
    });
    $("input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        send($("input").value);
      }
    });
    $("input").addEventListener("input", autoGrow);
    $("stop").addEventListener("click", stop);
    $("regenerate").addEventListener("click", regenerate);
    $("clear").addEventListener("click", clearConversation);
    $("export").addEventListener("click", exportConversation);
    $("load-file").addEventListener("change", (e) => {
      const file = e.target.files && e.target.files[0];
      if (file) loadFile(file).finally(() => { e.target.value = ""; });
    });
    $("recheck").addEventListener("click", () => {
      showError("");
      checkServer();
    });
    document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.busy) stop(); });
    // No polling: the VM stops itself when idle, and a page that pinged it would keep it billing.
    checkServer();
    $("input").focus();
  }

  // Exposed for the browser tests, which drive the page's own parsing and prompt code.
  window.tinycloudChat = {
    createSSEParser: sse.createSSEParser,
    buildPrompt: prompt.buildPrompt,
    pairTurns: prompt.pairTurns,
    fitPrompt,
    estimateTokens: tokens.estimate,
    interpretLoaded: transcript.interpretLoaded,
    state,
    promptFormat,
  };

  init();
})(tinycloud);
