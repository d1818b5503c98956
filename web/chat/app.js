// The page itself: its state, what each control does, and the start-up. It runs only in the page
// (inlined last, after the modules it uses); everything it computes lives in those modules.
//
// The page talks to one or more of the server's models, one column each (columns.js); with one
// column on the server's own model it is the plain chat page. A message goes to every column
// that can be asked; each column streams, stops, regenerates and keeps its conversation on its
// own, fitted into its own model's context.
(function (modules) {
  "use strict";

  const { sse, api, tokens, prompt, settings, transcript, columns: cols, comparison, tokenview, view, markdown } = modules;

  // The one place the rendered values come in: the JSON block web/render.py writes.
  const CONFIG = JSON.parse(document.getElementById("tinycloud-config").textContent);
  const BASE = CONFIG.url;
  const STORE = settings.createStore(() => window.localStorage);
  const COMPARISON_KEY = settings.comparisonKey(BASE);
  const client = api.createClient(BASE, CONFIG.api_key);
  const { el, messageView } = view;

  const $ = (id) => document.getElementById(id);
  const state = {
    info: null, // the server's /info, once read
    models: cols.servedModels(null, null), // what the server serves, its own model first
    modelsRead: false, // /v1/models asked (answered or not)
    selected: [cols.DEFAULT_KEY], // the columns' models, in order
    conversations: Object.create(null), // model key -> [{role, content, meta?, tokens?}]
    columns: [], // the shown columns: {key, messages, busy, controller, ui, views}
    learned: Object.create(null), // model key -> context limits the server's 422s stated
    estimators: new Map(), // model key -> token estimator (models may have different tokenizers)
    topMax: tokens.MAX_TOP_TOKENS, // alternatives per token the server takes, learned from a 422
    view: { tokens: false, colour: false },
    undo: null, // {selected, conversations} to put back
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
        state.selected = prev.selected;
        state.conversations = prev.conversations;
        save();
        render();
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

  // ---- the models -------------------------------------------------------------------------
  function modelOf(key) {
    return state.models.find((m) => m.key === key) || null;
  }

  // The server's own model can always be asked; another once /v1/models has listed it.
  function isServed(key) {
    return key === cols.DEFAULT_KEY || modelOf(key) !== null;
  }

  function nameOf(key) {
    const m = modelOf(key);
    return m ? m.name : key || "the server's model";
  }

  // The id a column's model goes by in exports: /info's for the server's own.
  function modelIdOf(key) {
    return key || (state.info && state.info.model_id) || null;
  }

  function promptFormat(key = cols.DEFAULT_KEY) {
    return prompt.chooseFormat(cols.formatOf(modelOf(key), state.info), CONFIG.prompt_format);
  }

  function estimator(key) {
    if (!state.estimators.has(key)) state.estimators.set(key, prompt.createTokenEstimator());
    return state.estimators.get(key);
  }

  // The server's count where it has /tokenize, else the estimate.
  async function countTokens(key, text, signal) {
    const adapter = cols.adapterId(key);
    const n = await client.tokenize(text, signal, adapter ? { adapter_id: adapter } : undefined);
    return n === null ? { n: estimator(key).estimate(text), exact: false } : { n, exact: true };
  }

  function fitPrompt(history, newest, values, signal, key = cols.DEFAULT_KEY) {
    return prompt.fitPrompt(history, newest, values, {
      format: promptFormat(key).format,
      info: cols.contextOf(modelOf(key), state.info, state.learned[key]),
      count: (text) => countTokens(key, text, signal),
    });
  }

  // ---- the columns ------------------------------------------------------------------------
  function anyBusy() {
    return state.columns.some((c) => c.busy);
  }

  function conversation(key) {
    state.conversations[key] ??= [];
    return state.conversations[key];
  }

  // The columns for the selection, keeping the record (and any stream) of a model still shown.
  function buildColumns() {
    const old = new Map(state.columns.map((c) => [c.key, c]));
    state.columns = state.selected.map((key, index) => {
      const col = old.get(key) || { key, busy: false, controller: null, views: [] };
      col.messages = conversation(key);
      col.ui = view.columnView(index, { onRegenerate: () => regenerate([col]), onStop: () => stop([col]) });
      return col;
    });
    $("columns").replaceChildren(...state.columns.map((c) => c.ui.section));
    $("columns").dataset.count = String(state.columns.length);
  }

  function renderColumn(col) {
    col.views = col.messages.map((m) => messageView(m, { showTokens: state.view.tokens }));
    col.ui.log.replaceChildren(...col.views.map((v) => v.li));
  }

  function render() {
    buildColumns();
    for (const col of state.columns) renderColumn(col);
    renderModels();
    refresh();
    scrollToEnd(true);
  }

  function canRegenerate(col) {
    return !col.busy && isServed(col.key) && col.messages.some((m) => m.role === "user");
  }

  function refresh() {
    const busy = anyBusy();
    const alone = state.columns.length === 1 && state.columns[0].key === cols.DEFAULT_KEY;
    const hasMessages = state.columns.some((c) => c.messages.length > 0);
    $("empty").hidden = hasMessages;
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("regenerate").disabled = busy || !state.columns.some(canRegenerate);
    $("clear").disabled = busy || !hasMessages;
    $("export").disabled = !hasMessages;
    $("export-md").disabled = !hasMessages;
    $("load-file").disabled = busy;
    for (const box of $("model-boxes").querySelectorAll("input")) box.disabled = busy;
    for (const col of state.columns) {
      const note = isServed(col.key) ? "" : state.modelsRead ? "not served by this server" : "checking…";
      col.ui.label(nameOf(col.key), alone, note);
      col.ui.regen.disabled = !canRegenerate(col);
      col.ui.stop.disabled = !col.busy;
      col.ui.log.setAttribute("aria-busy", col.busy ? "true" : "false");
    }
  }

  function scrollToEnd(force) {
    const s = $("scroller");
    if (force || s.scrollHeight - s.scrollTop - s.clientHeight < 120) s.scrollTop = s.scrollHeight;
  }

  // Keeps the comparison in the browser; when it does not fit with every answer's tokens, it is
  // kept without them (the text and statistics matter most; Export JSON keeps them all).
  function save() {
    const stored = cols.storedComparison(state.selected, state.conversations);
    if (STORE.save(COMPARISON_KEY, stored)) return;
    const lean = Object.create(null);
    for (const [key, messages] of Object.entries(stored.conversations)) {
      lean[key] = messages.map((m) => transcript.keptMessage(m.role, m.content, m.meta));
    }
    STORE.save(COMPARISON_KEY, { selected: stored.selected, conversations: lean });
  }

  function snapshot() {
    const copy = Object.create(null);
    for (const [key, messages] of Object.entries(state.conversations)) copy[key] = messages.slice();
    return { selected: state.selected.slice(), conversations: copy };
  }

  function autoGrow() {
    const t = $("input");
    t.style.height = "auto";
    t.style.height = Math.min(t.scrollHeight, window.innerHeight * 0.4) + "px";
  }

  // ---- the model checkboxes ---------------------------------------------------------------
  function renderModels() {
    const keys = [...state.models.map((m) => m.key), ...state.selected.filter((k) => !isServed(k))];
    const box = $("model-boxes");
    box.replaceChildren();
    for (const key of keys) {
      const input = el("input", { type: "checkbox", value: key });
      input.checked = state.selected.includes(key);
      input.addEventListener("change", () => selectModel(key, input.checked));
      const note = isServed(key) ? (key === cols.DEFAULT_KEY ? " (the server's own)" : "") : " (not served)";
      const label = el("label", { class: "toggle" });
      label.append(input, document.createTextNode(" " + nameOf(key) + note));
      box.append(label);
    }
    $("models").hidden = keys.length < 2;
  }

  function selectModel(key, on) {
    if (anyBusy()) return;
    const next = cols.toggleSelected(state.selected, key, on);
    if (on && !next.includes(key)) notify(`At most ${cols.MAX_COLUMNS} models side by side: untick one first.`);
    if (!on && next.includes(key)) notify("One model stays: tick another before unticking this one.");
    state.selected = next;
    save();
    render();
    // The boxes were drawn anew: keep the keyboard where it was.
    const box = [...$("model-boxes").querySelectorAll("input")].find((i) => i.value === key);
    if (box) box.focus();
  }

  // ---- sending and streaming --------------------------------------------------------------
  // Sends until the server takes the prompt: when our estimate was short and a 422 says by how
  // much, or states a context this model has that the page did not know, learn, refit and
  // resend (twice at most); when it takes fewer alternatives per token, ask for fewer.
  async function openStream(key, history, text, values, signal, onFit) {
    for (let retries = 0; ;) {
      const fit = await fitPrompt(history, text, values, signal, key);
      const stops = settings.stopSequences(values, fit.format);
      onFit(fit, stops);
      $("last-prompt").textContent = fit.prompt;
      const topN = Math.min(values.top_n_tokens, state.topMax);
      const extra = { topN, adapterId: cols.adapterId(key) };
      const body = { inputs: fit.prompt, parameters: settings.generationParameters(values, fit.maxNew, stops, extra) };
      try {
        return await client.generateStream(body, signal);
      } catch (err) {
        const top = api.topTokensLimitIn(err);
        if (top && topN > top.max) {
          learnTopMax(top.max);
          continue;
        }
        if (retries >= 2 || !learnContext(key, err, fit)) throw err;
        retries += 1;
      }
    }
  }

  // What a 422 teaches: the prompt's real size (when ours was an estimate), or the model's
  // context. False when it teaches nothing new, so the error stands.
  function learnContext(key, err, fit) {
    let learned = false;
    const limits = api.limitsIn(err);
    const known = state.learned[key] || {};
    if (limits && ((limits.maxTotal && limits.maxTotal !== known.maxTotal) ||
      (limits.maxInput && limits.maxInput !== known.maxInput))) {
      const before = cols.contextOf(modelOf(key), state.info, known);
      const now = cols.contextOf(modelOf(key), state.info, { ...known, ...limits });
      state.learned[key] = { ...known, ...limits };
      learned = before.max_total_tokens !== now.max_total_tokens || before.max_input_tokens !== now.max_input_tokens;
    }
    const counted = !fit.promptTokens.exact ? api.promptTokensIn(err) : 0;
    if (counted) estimator(key).learn(fit.prompt, counted);
    return learned || counted > 0;
  }

  function learnTopMax(max) {
    state.topMax = max;
    showAbout();
    notify(max
      ? `This server sends at most ${max} alternatives per token; asking for ${max}.`
      : "This server does not send the alternatives the model weighed (top_n_tokens): the token view shows each token's own probability.");
  }

  // One question to one column. Resolves to {ok} or, when nothing came back at all, to
  // {nothing: true, err, takeBack(), markFailed()}: the caller decides whether the turn goes
  // (and the message back to the composer) or stays with a failed answer. `restore`: the
  // column's conversation to put back instead (for Regenerate).
  async function ask(col, text, restore = null) {
    const history = col.messages.slice();
    const user = { role: "user", content: text };
    const reply = { role: "assistant", content: "", meta: {}, tokens: [] };
    col.messages.push(user, reply);
    const showTokens = state.view.tokens;
    const userView = messageView(user, { showTokens });
    const replyView = messageView(reply, { showTokens });
    col.views.push(userView, replyView);
    replyView.li.classList.add("streaming");
    col.ui.log.append(userView.li, replyView.li);
    scrollToEnd(true);

    const controller = new AbortController();
    col.controller = controller;
    col.busy = true;
    refresh();
    const started = performance.now();
    let token = null;
    const answer = api.createAnswer({ onToken: (data) => { token = tokens.tokenFromEvent(data); } });
    let firstTokenAt = 0;
    let fit = null;
    let stops = [];
    const ended = (reason, finalText, details = null) => finish(col, reply, replyView, {
      text: finalText, stops, started, firstTokenAt, tokens: answer.tokens, details, fit, reason,
    });
    try {
      const values = readSettings();
      const res = await openStream(col.key, history, text, values, controller.signal, (f, s) => {
        fit = f;
        stops = s;
      });
      await sse.readSSE(res, (ev) => {
        token = null;
        const shown = answer.take(ev);
        if (answer.tokens && !firstTokenAt) firstTokenAt = performance.now();
        if (token) reply.tokens.push(token);
        reply.content += shown;
        if (shown || token) {
          replyView.append(shown, token);
          scrollToEnd(false);
        }
      });
      const details = answer.details;
      if (details && details.input_length) estimator(col.key).learn(fit.prompt, details.input_length);
      ended(
        (details && details.finish_reason) || (answer.finalText === null ? "incomplete" : "unknown"),
        answer.finalText ?? reply.content,
        details,
      );
      return { ok: true };
    } catch (err) {
      if (err.name === "AbortError") {
        ended("stopped", reply.content);
        return { ok: true };
      }
      if (reply.content === "" && answer.tokens === 0) {
        if (restore) {
          col.messages.splice(0, col.messages.length, ...restore);
          renderColumn(col);
          return { ok: false, err };
        }
        return {
          nothing: true, err,
          takeBack() {
            col.messages.splice(col.messages.indexOf(user), 2);
            col.views.splice(col.views.indexOf(userView), 2);
            userView.li.remove();
            replyView.li.remove();
          },
          markFailed: () => ended("error", ""),
        };
      }
      ended("error", reply.content);
      return { ok: false, err };
    } finally {
      col.busy = false;
      col.controller = null;
      save();
      refresh();
      controller.abort(); // no-op after a clean end; frees the connection after an error
    }
  }

  // The errors of several columns, each named by its model when there are several.
  function reportErrors(failures) {
    const many = state.columns.length > 1;
    showError(failures.map(({ col, err }) => (many ? nameOf(col.key) + ": " : "") + describeError(err)).join("\n\n"));
  }

  async function send(text) {
    text = text.trim();
    if (!text || anyBusy()) return;
    const targets = state.columns.filter((c) => isServed(c.key));
    if (!targets.length) {
      showError("None of these columns' models is served by this server: tick a model it serves (Compare).");
      return;
    }
    showError("");
    state.undo = null;
    $("input").value = "";
    autoGrow();
    notify("Generating…");
    const outcomes = await Promise.all(targets.map((col) => ask(col, text).then((o) => ({ col, ...o }))));
    const empty = outcomes.filter((o) => o.nothing);
    if (empty.length && empty.length === outcomes.length) {
      // Nothing came back from any model: take the turn out again and give the message back.
      for (const o of empty) o.takeBack();
      $("input").value = text;
      autoGrow();
      notify("");
      refresh();
    } else {
      for (const o of empty) o.markFailed();
    }
    const failures = outcomes.filter((o) => o.err);
    if (failures.length) reportErrors(failures);
    save();
    if (focusOnControls()) $("input").focus();
  }

  // After an answer, move focus back to the message box unless the user went elsewhere meanwhile.
  function focusOnControls() {
    const active = document.activeElement;
    return !active || active === document.body || active === $("stop") || active === $("send") ||
      active.classList.contains("column-stop");
  }

  function finish(col, reply, replyView, r) {
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
    if (!reply.tokens.length) {
      delete reply.tokens; // none came: the answer shows as text in either view
      replyView.setTokenView(state.view.tokens);
    }
    replyView.meta(reply.meta);
    const rate = reply.meta.tokens_per_s ? `, ${reply.meta.tokens_per_s.toFixed(1)} tokens/s` : "";
    const who = state.columns.length > 1 ? nameOf(col.key) + ": " : "";
    if (r.reason === "error") return;
    notify(who + (r.reason === "stopped" ? "Stopped." : `Answer complete: ${generated} tokens${rate}, finish reason ${r.reason}.`));
  }

  function stop(which = state.columns) {
    for (const col of which) if (col.controller) col.controller.abort();
  }

  // Asks each given column's last question again, in place of its last answer.
  async function regenerate(which = state.columns) {
    const ready = which.filter(canRegenerate);
    if (!ready.length) return;
    showError("");
    const outcomes = await Promise.all(ready.map((col) => {
      let i = col.messages.length - 1;
      while (col.messages[i].role !== "user") i -= 1;
      const text = col.messages[i].content;
      const before = col.messages.slice();
      col.messages.splice(i);
      renderColumn(col);
      return ask(col, text, before).then((o) => ({ col, ...o }));
    }));
    const failures = outcomes.filter((o) => o.err);
    if (failures.length) reportErrors(failures);
    if (focusOnControls()) $("input").focus();
  }

  // ---- export / load ----------------------------------------------------------------------
  function download(text, type, filename) {
    const blob = new Blob([text], { type });
    const a = el("a", { href: URL.createObjectURL(blob), download: filename });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }

  // One column on the server's own model: the chat format, as before compare mode. Else the
  // comparison format, which Load JSON… checks whole before taking it back.
  function exportJSON() {
    const alone = state.columns.length === 1 && state.columns[0].key === cols.DEFAULT_KEY;
    let out;
    if (alone) {
      const { format, source } = promptFormat();
      out = transcript.exportDocument({
        server: BASE, model: modelIdOf(cols.DEFAULT_KEY), format, source,
        settings: readSettings(), messages: state.columns[0].messages,
      });
    } else {
      out = comparison.exportComparison({
        server: BASE, settings: readSettings(),
        columns: state.columns.map((c) => ({ model: modelIdOf(c.key), own: c.key === cols.DEFAULT_KEY, messages: c.messages })),
      });
    }
    download(JSON.stringify(out.doc, null, 2) + "\n", "application/json", out.filename);
    const n = state.columns.reduce((sum, c) => sum + c.messages.length, 0);
    notify(alone ? `Exported ${n} messages.` : `Exported a comparison of ${state.columns.length} models (${n} messages).`);
  }

  function exportMarkdown() {
    const now = new Date();
    const text = markdown.comparisonMarkdown({
      server: BASE, settings: readSettings(), now,
      cols: state.columns.map((c) => ({ name: nameOf(c.key), messages: c.messages })),
    });
    download(text, "text/markdown", `comparison-${now.toISOString().replace(/[:.]/g, "-")}.md`);
    notify("Exported the transcript as Markdown.");
  }

  // A checked comparison's columns become the page's, each on the model it names (the server's
  // own when it is the one named); a model this server does not serve keeps its column, which
  // shows its conversation but is not asked.
  function takeComparison(loaded, name) {
    const ownId = state.info ? state.info.model_id : null;
    const conversations = Object.create(null);
    const selected = [];
    for (const [i, c] of loaded.columns.entries()) {
      const key = cols.keyFor(c.model, c.own, ownId);
      if (selected.includes(key)) throw new Error(`columns[${i}] is a second column for ${nameOf(key)}.`);
      selected.push(key);
      conversations[key] = c.messages;
    }
    state.undo = snapshot();
    state.selected = selected;
    state.conversations = conversations;
    if (loaded.settings && typeof loaded.settings.system === "string") {
      $("set-system").value = loaded.settings.system;
      saveSettings();
    }
    save();
    render();
    notify(`Loaded a comparison of ${selected.length} models from ${name}.`, "Undo");
  }

  // A loaded conversation goes into every shown column: to carry it on with each model.
  function takeConversation(parsed, name) {
    state.undo = snapshot();
    if (parsed.system !== null && parsed.system !== undefined) {
      $("set-system").value = parsed.system;
      saveSettings();
    }
    for (const col of state.columns) state.conversations[col.key] = parsed.messages.map((m) => ({ ...m }));
    save();
    render();
    notify(`Loaded a conversation of ${parsed.messages.length} messages from ${name}.`, "Undo");
  }

  async function loadFile(file) {
    showError("");
    try {
      const read = transcript.readFile(file.name, file.type, await file.text());
      if ("value" in read && comparison.isComparison(read.value)) {
        takeComparison(comparison.readComparison(read.value), file.name);
        return;
      }
      const parsed = "prompt" in read ? read : transcript.interpretLoaded(read.value);
      if (parsed.messages) {
        takeConversation(parsed, file.name);
      } else {
        $("input").value = parsed.prompt;
        autoGrow();
        $("input").focus();
        notify(`Loaded a prompt from ${file.name}: review it, then send.`);
      }
    } catch (e) {
      showError(`Could not load ${file.name}: ${e.message}`);
    }
  }

  function clearConversation() {
    if (anyBusy() || !state.columns.some((c) => c.messages.length)) return;
    state.undo = snapshot();
    for (const col of state.columns) state.conversations[col.key] = [];
    save();
    render();
    showError("");
    notify("Conversation cleared.", "Undo");
    $("input").focus();
  }

  // ---- looking inside -----------------------------------------------------------------------
  function setTokenView(tokensOn, colourOn) {
    state.view = { tokens: tokensOn || colourOn, colour: colourOn };
    $("show-tokens").checked = state.view.tokens;
    $("colour-tokens").checked = state.view.colour;
    document.body.classList.toggle("colour-tokens", state.view.colour);
    $("token-legend").hidden = !state.view.colour;
    for (const col of state.columns) for (const v of col.views) v.setTokenView(state.view.tokens);
    STORE.save(settings.VIEW_KEY, state.view);
  }

  function buildLegend() {
    const items = tokens.BUCKETS.map((b, i) => [String(i), b.label]);
    items.push(["none", "not reported"]);
    $("legend-list").replaceChildren(...items.map(([p, label]) => {
      const li = el("li");
      li.append(el("span", { class: "swatch", "data-p": p, "aria-hidden": "true" }), document.createTextNode(label));
      return li;
    }));
  }

  // ---- server health and models -------------------------------------------------------------
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
    state.models = cols.servedModels(state.info ? await client.models() : null, state.info);
    state.modelsRead = true;
    showAbout();
    if (anyBusy()) refresh();
    else render();
  }

  function showAbout() {
    const info = state.info || {};
    $("model-name").textContent = info.model_id || "unknown";
    $("about-context").textContent = info.max_total_tokens
      ? `${info.max_total_tokens} tokens in all, ${info.max_input_tokens ?? "?"} for the prompt`
      : "unknown (the server did not say)";
    $("about-format").textContent = promptFormat().source;
    $("about-tokens").textContent = state.topMax
      ? `up to ${state.topMax} per token, when asked for (Alternatives per token)`
      : "not sent by this server (top_n_tokens refused)";
  }

  // ---- wiring -----------------------------------------------------------------------------
  function restoreState() {
    const stored = STORE.load(COMPARISON_KEY, null);
    const legacy = STORE.load(settings.conversationKey(BASE), []);
    const restored = cols.restoreComparison(stored, transcript.restoreConversation, legacy);
    state.selected = restored.selected;
    state.conversations = restored.conversations;
  }

  function init() {
    writeSettings(settings.loadSettings(STORE));
    restoreState();
    buildLegend();
    tokenview.install($("scroller"), $("token-tip"));
    const viewPrefs = STORE.load(settings.VIEW_KEY, {});
    render();
    setTokenView(viewPrefs && viewPrefs.tokens === true, viewPrefs && viewPrefs.colour === true);
    showAbout();
    // Settings start folded (the markup's default) on a phone-sized screen, where the
    // conversation needs the room; open beside it on a wider one.
    if (!window.matchMedia("(max-width: 860px)").matches) $("settings-box").open = true;

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
    $("stop").addEventListener("click", () => stop());
    $("regenerate").addEventListener("click", () => regenerate());
    $("clear").addEventListener("click", clearConversation);
    $("export").addEventListener("click", exportJSON);
    $("export-md").addEventListener("click", exportMarkdown);
    $("show-tokens").addEventListener("change", (e) => setTokenView(e.target.checked, e.target.checked && state.view.colour));
    $("colour-tokens").addEventListener("change", (e) => setTokenView(state.view.tokens, e.target.checked));
    $("load-file").addEventListener("change", (e) => {
      const file = e.target.files && e.target.files[0];
      if (file) loadFile(file).finally(() => { e.target.value = ""; });
    });
    $("recheck").addEventListener("click", () => {
      showError("");
      checkServer();
    });
    document.addEventListener("keydown", (e) => { if (e.key === "Escape" && anyBusy()) stop(); });
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
    estimateTokens: (text) => estimator(cols.DEFAULT_KEY).estimate(text),
    interpretLoaded: transcript.interpretLoaded,
    state,
    promptFormat,
  };

  init();
})(tinycloud);
