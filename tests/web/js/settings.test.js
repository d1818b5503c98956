// web/chat/settings.js: settings kept in the browser's storage, and what they become in a request.
// The real localStorage round trip (a reload) is tested in Chromium (test_chat_page.py); here a
// Storage with the same interface stands in, including the ways a real one fails.
"use strict";

const assert = require("node:assert/strict");
const { describe, it } = require("node:test");

const {
  DEFAULTS, SETTINGS_KEY, MAX_STOP_SEQUENCES, conversationKey,
  createStore, restoreSettings, loadSettings, saveSettings, parseSettings, stopSequences, generationParameters,
} = require("../../../web/chat/settings.js");

// The Web Storage interface: strings in, strings (or null) out.
class MemoryStorage {
  constructor(entries = {}) { this.map = new Map(Object.entries(entries)); }
  getItem(key) { return this.map.has(key) ? this.map.get(key) : null; }
  setItem(key, value) { this.map.set(key, String(value)); }
}

const storeOf = (entries) => {
  const storage = new MemoryStorage(entries);
  return { storage, store: createStore(() => storage) };
};
const TYPED = {
  max_new_tokens: "64", temperature: "0", top_p: "0.5", top_k: "", repetition_penalty: "abc",
  top_n_tokens: "3", seed: "42", stop: "###\\n\nEND", system: "Be brief. ☃",
};

describe("settings in storage", () => {
  it("round-trips what was typed, as typed", () => {
    const { storage, store } = storeOf();
    saveSettings(store, TYPED);
    assert.equal(typeof storage.getItem(SETTINGS_KEY), "string");
    assert.deepEqual(loadSettings(store), TYPED);
    assert.deepEqual(loadSettings(createStore(() => new MemoryStorage(Object.fromEntries(storage.map)))), TYPED);
  });

  it("gives the defaults when nothing is stored", () => {
    assert.deepEqual(loadSettings(storeOf().store), { ...DEFAULTS });
  });

  it("ignores stored text that is not JSON, or JSON that is not an object", () => {
    for (const raw of ["{not json", "", "null", "42", '"max_new_tokens"', "[1, 2]", "true"]) {
      assert.deepEqual(loadSettings(storeOf({ [SETTINGS_KEY]: raw }).store), { ...DEFAULTS }, raw);
    }
  });

  it("takes each usable value from an old or damaged entry and defaults the rest", () => {
    const stored = {
      max_new_tokens: 300, // a number, as an older page may have kept it
      temperature: { value: 1 }, top_p: null, top_k: NaN, repetition_penalty: true,
      stop: ["x"], system: "Kept.", unknown_setting: "dropped",
    };
    assert.deepEqual(restoreSettings(stored), { ...DEFAULTS, max_new_tokens: 300, system: "Kept." });
    assert.deepEqual(restoreSettings({ max_new_tokens: Infinity }), { ...DEFAULTS });
    // Through storage, NaN and Infinity became null.
    const { store } = storeOf({ [SETTINGS_KEY]: JSON.stringify(stored) });
    assert.deepEqual(loadSettings(store), { ...DEFAULTS, max_new_tokens: 300, system: "Kept." });
  });

  it("keeps working when storage is off, full, or throws on access", () => {
    const off = createStore(() => { throw new Error("SecurityError: storage is disabled"); });
    assert.equal(off.save("k", 1), false); // the caller can tell, and keep less
    saveSettings(off, TYPED);
    assert.deepEqual(loadSettings(off), { ...DEFAULTS });
    const full = new MemoryStorage();
    full.setItem = () => { throw new Error("QuotaExceededError"); };
    const store = createStore(() => full);
    saveSettings(store, TYPED);
    assert.deepEqual(loadSettings(store), { ...DEFAULTS });
  });

  it("keeps each server's conversation under its own key, beside the shared settings", () => {
    const { storage, store } = storeOf();
    store.save(conversationKey("http://a:1"), [{ role: "user", content: "hi" }]);
    saveSettings(store, TYPED);
    assert.deepEqual(store.load(conversationKey("http://a:1"), []), [{ role: "user", content: "hi" }]);
    assert.deepEqual(store.load(conversationKey("http://b:1"), []), []);
    assert.equal(storage.map.size, 2);
    assert.notEqual(conversationKey("http://a:1"), SETTINGS_KEY);
  });
});

describe("parseSettings", () => {
  it("reads numbers; an empty or bad number is the default; text stays as typed", () => {
    assert.deepEqual(parseSettings(TYPED), {
      max_new_tokens: 64, temperature: 0, top_p: 0.5, top_k: DEFAULTS.top_k,
      repetition_penalty: DEFAULTS.repetition_penalty, top_n_tokens: 3, seed: 42, stop: "###\\n\nEND",
      system: "Be brief. ☃",
    });
    assert.deepEqual(parseSettings({}), { ...DEFAULTS, seed: null });
    assert.equal(parseSettings({ max_new_tokens: " 12 " }).max_new_tokens, 12);
    assert.equal(parseSettings({ max_new_tokens: "1e400" }).max_new_tokens, DEFAULTS.max_new_tokens);
    assert.equal(parseSettings({ temperature: "-1" }).temperature, -1); // the server says what is wrong
  });

  it("reads a seed: empty is none (a fresh draw), a whole number is sent, anything else as typed", () => {
    assert.equal(parseSettings({ seed: "" }).seed, null);
    assert.equal(parseSettings({ seed: "  " }).seed, null);
    assert.equal(parseSettings({ seed: " 7 " }).seed, 7);
    assert.equal(parseSettings({ seed: "0" }).seed, 0);
    assert.equal(parseSettings({ seed: "-3" }).seed, -3); // the server says a seed cannot be negative
    assert.equal(parseSettings({ seed: "1.5" }).seed, "1.5"); // ... or a fraction
    // Past 2**53 a JavaScript number would round it and send another seed: sent as typed instead.
    assert.equal(parseSettings({ seed: "9007199254740993" }).seed, "9007199254740993");
    assert.equal(parseSettings({ seed: String(Number.MAX_SAFE_INTEGER) }).seed, Number.MAX_SAFE_INTEGER);
  });
});

describe("stopSequences", () => {
  it("takes one per line, with \\n and \\t written out, without repeats, then the format's", () => {
    assert.deepEqual(stopSequences({ stop: "###\\n\n\nEND\\tX\n###\\n" }, { stop: "User:" }), ["###\n", "END\tX", "User:"]);
    assert.deepEqual(stopSequences({ stop: "User:" }, { stop: "User:" }), ["User:"]);
    assert.deepEqual(stopSequences({ stop: "" }, { stop: "" }), []);
  });

  it("leaves the format's out once the user's fill TGI's limit", () => {
    const four = ["a", "b", "c", "d"];
    assert.equal(four.length, MAX_STOP_SEQUENCES);
    assert.deepEqual(stopSequences({ stop: four.join("\n") }, { stop: "User:" }), four);
    assert.deepEqual(stopSequences({ stop: "a\nb\nc" }, { stop: "User:" }), ["a", "b", "c", "User:"]);
  });
});

describe("generationParameters", () => {
  const values = (extra) => ({ ...DEFAULTS, ...extra });

  it("samples with the filters that are on", () => {
    assert.deepEqual(generationParameters(values({}), 99.7, ["X"]), {
      max_new_tokens: 99, repetition_penalty: 1.1, stop: ["X"], details: true,
      do_sample: true, temperature: 0.7, top_p: 0.95, top_k: 50,
    });
  });

  it("leaves out top-p 1 and top-k 0 (off)", () => {
    const p = generationParameters(values({ top_p: 1, top_k: 0, temperature: 1 }), 5, []);
    assert.equal("top_p" in p, false);
    assert.equal("top_k" in p, false);
    assert.equal(p.do_sample, true);
  });

  it("asks for alternatives per token and a served model only when told to", () => {
    const plain = generationParameters(values({}), 5, []);
    assert.equal("top_n_tokens" in plain, false);
    assert.equal("adapter_id" in plain, false);
    const p = generationParameters(values({}), 5, [], { topN: 5, adapterId: "sft-run" });
    assert.equal(p.top_n_tokens, 5);
    assert.equal(p.adapter_id, "sft-run");
    assert.equal("top_n_tokens" in generationParameters(values({}), 5, [], { topN: 0 }), false);
    assert.equal(generationParameters(values({}), 5, [], { topN: 2.9 }).top_n_tokens, 2);
  });

  it("sends a seed with sampling, and none when there is none or the answer is greedy", () => {
    assert.equal(generationParameters(values({ seed: 42 }), 5, []).seed, 42);
    assert.equal(generationParameters(values({ seed: 0 }), 5, []).seed, 0);
    assert.equal(generationParameters(values({ seed: "1.5" }), 5, []).seed, "1.5");
    assert.equal("seed" in generationParameters(values({ seed: null }), 5, []), false);
    assert.equal("seed" in generationParameters(values({ seed: 42, temperature: 0 }), 5, []), false);
  });

  it("answers greedily at temperature 0, sending no sampling settings", () => {
    assert.deepEqual(generationParameters(values({ temperature: 0 }), 5, []), {
      max_new_tokens: 5, repetition_penalty: 1.1, stop: [], details: true, do_sample: false,
    });
  });
});
