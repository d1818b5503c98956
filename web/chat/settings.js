// Generation settings: their defaults, how they persist in the browser's storage, and what they
// become in a request.
(function (exports) {
  "use strict";

  const DEFAULTS = Object.freeze({
    max_new_tokens: 200, temperature: 0.7, top_p: 0.95, top_k: 50, repetition_penalty: 1.1,
    top_n_tokens: 5, seed: "", stop: "", system: "",
  });
  const NUMBER_SETTINGS = ["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "top_n_tokens"];
  const MAX_STOP_SEQUENCES = 4; // TGI's limit
  // Settings follow the person; a conversation belongs to the server it was held with (pages
  // opened from disk may all share one storage). A new layout gets a new version, and a stored
  // value the page cannot use is ignored, so an old or damaged entry never breaks the page.
  const SETTINGS_KEY = "tinycloud.chat.settings.v1";
  const conversationKey = (base) => "tinycloud.chat.conversation.v1:" + base; // before compare mode
  const comparisonKey = (base) => "tinycloud.chat.comparison.v1:" + base; // columns.storedComparison
  const VIEW_KEY = "tinycloud.chat.view.v1"; // the token view's toggles

  // JSON in Web Storage (`getStorage()` returns localStorage). Storage can be off, full, or
  // throw on mere access (a file page with site data blocked): then nothing is kept, and the
  // page works on.
  function createStore(getStorage) {
    return {
      load(key, fallback) {
        try {
          const raw = getStorage().getItem(key);
          return raw === null ? fallback : JSON.parse(raw);
        } catch {
          return fallback;
        }
      },
      // True when it was kept; false when storage is full or off.
      save(key, value) {
        try {
          getStorage().setItem(key, JSON.stringify(value));
          return true;
        } catch {
          return false;
        }
      },
    };
  }

  // The settings form's values from what was stored: each value as it was typed (a string, or a
  // number from an older page); anything else, or a missing one, is the default.
  function restoreSettings(stored) {
    const out = {};
    const ok = stored && typeof stored === "object" && !Array.isArray(stored);
    for (const key of Object.keys(DEFAULTS)) {
      const v = ok ? stored[key] : undefined;
      out[key] = typeof v === "string" || (typeof v === "number" && Number.isFinite(v)) ? v : DEFAULTS[key];
    }
    return out;
  }

  function loadSettings(store) {
    return restoreSettings(store.load(SETTINGS_KEY, {}));
  }

  // `raw`: the form's values as typed; a bad one is kept so the server can say what is wrong.
  function saveSettings(store, raw) {
    store.save(SETTINGS_KEY, raw);
  }

  // The settings a request uses, from the form's values as typed: a number setting left empty or
  // not a number takes its default. The seed is null when empty (a fresh draw each time), a
  // number when it is a whole number a JavaScript number holds exactly, and otherwise the text as
  // typed, so the server's 422 says what is wrong with it.
  function parseSettings(raw) {
    const out = {};
    for (const key of Object.keys(DEFAULTS)) {
      const text = String(raw[key] ?? "");
      if (key === "seed") {
        const n = Number(text);
        out.seed = text.trim() === "" ? null : Number.isSafeInteger(n) ? n : text;
      } else if (NUMBER_SETTINGS.includes(key)) {
        const n = text.trim() === "" ? NaN : Number(text);
        out[key] = Number.isFinite(n) ? n : DEFAULTS[key];
      } else {
        out[key] = text;
      }
    }
    return out;
  }

  // The user's stop sequences (one per line, `\n` and `\t` written out), then the format's own
  // while fewer than TGI's limit.
  function stopSequences(settings, format) {
    const mine = settings.stop.split("\n").map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"))
      .filter((s) => s.length > 0);
    const all = [...new Set(mine)];
    if (format.stop && !all.includes(format.stop) && all.length < MAX_STOP_SEQUENCES) all.push(format.stop);
    return all;
  }

  // TGI's `parameters`: temperature 0 means greedy, top-p 1 and top-k 0 are left out (off), and
  // a seed goes only with sampling (a greedy answer draws nothing).
  // `topN`: the alternatives to ask for per token (0 or less: none, and the field is left out, so
  // a server without `top_n_tokens` is not asked for it); `adapterId`: the served model to use
  // where there are several (none: the server's own, /info's model).
  function generationParameters(settings, maxNew, stops, { topN = 0, adapterId = null } = {}) {
    const p = {
      max_new_tokens: Math.trunc(maxNew),
      repetition_penalty: settings.repetition_penalty,
      stop: stops,
      details: true,
    };
    if (topN >= 1) p.top_n_tokens = Math.trunc(topN);
    if (adapterId) p.adapter_id = adapterId;
    if (settings.temperature > 0) {
      p.do_sample = true;
      p.temperature = settings.temperature;
      if (settings.top_p !== 1) p.top_p = settings.top_p;
      if (settings.top_k !== 0) p.top_k = Math.trunc(settings.top_k);
      if ((settings.seed ?? "") !== "") p.seed = settings.seed; // "": the default, as stored
    } else {
      p.do_sample = false;
    }
    return p;
  }

  exports.DEFAULTS = DEFAULTS;
  exports.NUMBER_SETTINGS = NUMBER_SETTINGS;
  exports.MAX_STOP_SEQUENCES = MAX_STOP_SEQUENCES;
  exports.SETTINGS_KEY = SETTINGS_KEY;
  exports.conversationKey = conversationKey;
  exports.comparisonKey = comparisonKey;
  exports.VIEW_KEY = VIEW_KEY;
  exports.createStore = createStore;
  exports.restoreSettings = restoreSettings;
  exports.loadSettings = loadSettings;
  exports.saveSettings = saveSettings;
  exports.parseSettings = parseSettings;
  exports.stopSequences = stopSequences;
  exports.generationParameters = generationParameters;
})(typeof tinycloud === "object" ? (tinycloud.settings = {}) : module.exports);
