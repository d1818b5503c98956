// web/chat/transcript.js: what Export JSON writes and what Load JSON… and the stored copy take back.
"use strict";

const assert = require("node:assert/strict");
const { describe, it } = require("node:test");

const {
  LOAD_HELP, interpretLoaded, interpretFile, restoreConversation, exportDocument,
} = require("../../../web/chat/transcript.js");

const MESSAGES = [
  { role: "user", content: "<b>hi</b>" },
  { role: "assistant", content: "Hello.", meta: { tokens: 3, tokens_per_s: 12.5, finish_reason: "eos_token" } },
];

describe("exportDocument", () => {
  it("writes the conversation with its settings and format, and loads back the same", () => {
    const now = new Date("2025-01-02T03:04:05.678Z");
    const { doc, filename } = exportDocument({
      server: "http://h:1", model: "tiny", format: { user_prefix: "U" }, source: "rendered into this page",
      settings: { max_new_tokens: 5 }, messages: MESSAGES, now,
    });
    assert.equal(filename, "chat-2025-01-02T03-04-05-678Z.json");
    assert.deepEqual(doc, {
      format: "tinycloud-chat", version: 1, exported_at: "2025-01-02T03:04:05.678Z", server: "http://h:1",
      model: "tiny", prompt_format: { user_prefix: "U", source: "rendered into this page" },
      settings: { max_new_tokens: 5 }, messages: MESSAGES,
    });
    const back = interpretFile(filename, "application/json", JSON.stringify(doc));
    assert.deepEqual(back, { messages: MESSAGES, system: null });
  });
});

describe("interpretLoaded", () => {
  it("takes a bare list, a system message, and keeps only known statistics as numbers", () => {
    const loaded = interpretLoaded([
      { role: "system", content: "Be brief." },
      { role: "user", content: "q" },
      { role: "assistant", content: "a", meta: { tokens: "9", dropped: 2, finish_reason: "x".repeat(99), html: "<b>" } },
    ]);
    assert.deepEqual(loaded, {
      system: "Be brief.",
      messages: [
        { role: "user", content: "q" },
        { role: "assistant", content: "a", meta: { dropped: 2, finish_reason: "x".repeat(40) } },
      ],
    });
  });

  it("takes a single prompt in each of its forms", () => {
    assert.deepEqual(interpretLoaded("just text"), { prompt: "just text" });
    assert.deepEqual(interpretLoaded({ prompt: "p" }), { prompt: "p" });
    assert.deepEqual(interpretLoaded({ inputs: "tgi" }), { prompt: "tgi" });
    assert.deepEqual(interpretLoaded({ instruction: " Name a color. ", input: " warm " }), { prompt: "Name a color.\n\nwarm" });
    assert.deepEqual(interpretLoaded({ instruction: "Name a color.", input: "  " }), { prompt: "Name a color." });
  });

  it("says what is wrong with anything else", () => {
    assert.throws(() => interpretLoaded({ rows: [] }), { message: LOAD_HELP });
    assert.throws(() => interpretLoaded(null), { message: LOAD_HELP });
    assert.throws(() => interpretLoaded([{ role: "user" }]), { message: `message 1 has no text "content". ${LOAD_HELP}` });
    assert.throws(
      () => interpretLoaded({ messages: [{ role: "user", content: "q" }, { role: "tool", content: "x" }] }),
      { message: 'message 2 has role "tool"; use "user", "assistant" or "system".' },
    );
  });
});

describe("interpretFile", () => {
  it("treats a .txt or text/plain file as a prompt, even if it looks like JSON", () => {
    assert.deepEqual(interpretFile("q.TXT", "", '{"prompt": 1}'), { prompt: '{"prompt": 1}' });
    assert.deepEqual(interpretFile("q", "text/plain", "hello"), { prompt: "hello" });
  });

  it("says when a file is not JSON", () => {
    assert.throws(() => interpretFile("c.json", "application/json", "{oops"), /^Error: it is not valid JSON \(.+\)\.$/);
  });
});

describe("restoreConversation", () => {
  it("restores a stored conversation, and starts empty from anything that is not one", () => {
    assert.deepEqual(restoreConversation(MESSAGES), MESSAGES);
    for (const bad of [null, {}, "text", { messages: MESSAGES }, [{ role: "tool", content: "x" }], [null]]) {
      assert.deepEqual(restoreConversation(bad), [], JSON.stringify(bad));
    }
  });
});
