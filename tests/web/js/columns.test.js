// web/chat/columns.js: which models the server serves, how a column picks one (TGI's
// adapter_id), each column's context, and the comparison kept in the browser's storage.
"use strict";

const assert = require("node:assert/strict");
const { describe, it } = require("node:test");

const {
  DEFAULT_KEY, MAX_COLUMNS, servedModels, adapterId, contextOf, formatOf, restoreComparison, storedComparison,
  toggleSelected, keyFor, turnsOf,
} = require("../../../web/chat/columns.js");
const { restoreConversation } = require("../../../web/chat/transcript.js");

const INFO = {
  model_id: "sft-run", max_total_tokens: 256, max_input_tokens: 255,
  prompt_format: { user_prefix: "### Instruction:\n", user_suffix: "\n### Response:\n" },
};
const model = (id, extra = {}) => ({ id, object: "model", created: 0, owned_by: "tinycloud", ...extra });

describe("servedModels", () => {
  it("is the server's own model alone where /v1/models lists just it (TGI, one run)", () => {
    const models = servedModels({ object: "list", data: [model("sft-run")] }, INFO);
    assert.deepEqual(models.map((m) => [m.key, m.name]), [[DEFAULT_KEY, "sft-run"]]);
    assert.equal(models[0].maxTotal, 256);
  });

  it("lists the others after it, each once, in the server's order", () => {
    const listed = { data: [model("base-run"), model("sft-run"), model("lora-run"), model("base-run")] };
    const models = servedModels(listed, INFO);
    assert.deepEqual(models.map((m) => m.key), [DEFAULT_KEY, "base-run", "lora-run"]);
    assert.deepEqual(models.map((m) => m.name), ["sft-run", "base-run", "lora-run"]);
  });

  it("reads a listed model's own context and format when its entry has them", () => {
    const listed = { data: [model("base-run", { max_total_tokens: 128, max_input_tokens: 127, prompt_format: null })] };
    const base = servedModels(listed, INFO)[1];
    assert.equal(base.maxTotal, 128);
    assert.equal(base.maxInput, 127);
    assert.equal(base.promptFormat, null); // it speaks for itself: no format
  });

  it("skips entries that are not models, and offers only the server's own without /info", () => {
    const listed = { data: [null, "x", { id: 3 }, { id: "" }, { id: "  " }, { id: "y".repeat(201) }, model("ok")] };
    assert.deepEqual(servedModels(listed, INFO).map((m) => m.key), [DEFAULT_KEY, "ok"]);
    assert.deepEqual(servedModels(listed, null).map((m) => m.key), [DEFAULT_KEY]);
    assert.deepEqual(servedModels(null, INFO).map((m) => m.key), [DEFAULT_KEY]);
    assert.deepEqual(servedModels({ data: "nope" }, INFO).map((m) => m.key), [DEFAULT_KEY]);
  });

  it("asks for the server's own model without adapter_id, any other by it", () => {
    assert.equal(adapterId(DEFAULT_KEY), null);
    assert.equal(adapterId("base-run"), "base-run");
  });
});

describe("contextOf and formatOf", () => {
  const [own, base] = servedModels({ data: [model("base-run", { max_total_tokens: 128 })] }, INFO);
  const other = servedModels({ data: [model("other")] }, INFO)[1];

  it("takes the model's own context, else /info's, and what the server's 422 taught over both", () => {
    assert.deepEqual(contextOf(own, INFO), { max_total_tokens: 256, max_input_tokens: 255 });
    assert.deepEqual(contextOf(base, INFO), { max_total_tokens: 128, max_input_tokens: 127 }); // input below total
    assert.deepEqual(contextOf(other, INFO), { max_total_tokens: 256, max_input_tokens: 255 });
    assert.deepEqual(contextOf(other, INFO, { maxTotal: 64 }), { max_total_tokens: 64, max_input_tokens: 63 });
    assert.deepEqual(contextOf(null, null), {});
  });

  it("takes a model's format from its entry when it has one there, else /info's", () => {
    assert.deepEqual(formatOf(own, INFO), INFO.prompt_format);
    assert.deepEqual(formatOf(other, INFO), INFO.prompt_format);
    const bare = servedModels({ data: [model("base-run", { prompt_format: null })] }, INFO)[1];
    assert.equal(formatOf(bare, INFO), null);
  });
});

describe("the stored comparison", () => {
  const convo = [{ role: "user", content: "hi" }, { role: "assistant", content: "Hello." }];

  it("round-trips the selection and every conversation that has messages", () => {
    const stored = storedComparison(["", "base-run"], { "": convo, "base-run": [], gone: convo });
    const back = restoreComparison(JSON.parse(JSON.stringify(stored)), restoreConversation);
    assert.deepEqual(back.selected, ["", "base-run"]);
    assert.deepEqual({ ...back.conversations }, { "": convo, "base-run": [], gone: convo });
  });

  it("takes an older page's single conversation as the server's own model's", () => {
    const back = restoreComparison(null, restoreConversation, convo);
    assert.deepEqual(back.selected, [DEFAULT_KEY]);
    assert.deepEqual(back.conversations[DEFAULT_KEY], convo);
  });

  it("ignores what it cannot use: damaged entries, a key that would reach the prototype", () => {
    const stored = JSON.parse('{"selected": [1, "", "", "a"], "conversations": {"__proto__": [{"role": "user", "content": "x"}], "a": "nope", "": [{"role": "bot"}]}}');
    const back = restoreComparison(stored, restoreConversation);
    assert.deepEqual(back.selected, ["", "a"]);
    assert.deepEqual(back.conversations.a, []);
    assert.deepEqual(back.conversations[""], []);
    assert.equal(Object.getPrototypeOf(back.conversations), null);
    assert.equal({}.role, undefined);
    assert.deepEqual(restoreComparison("garbage", restoreConversation, "garbage").selected, [DEFAULT_KEY]);
    assert.deepEqual(restoreComparison({ selected: [] }, restoreConversation).selected, [DEFAULT_KEY]);
    const many = restoreComparison({ selected: ["a", "b", "c", "d", "e", "f"] }, restoreConversation);
    assert.equal(many.selected.length, MAX_COLUMNS);
  });
});

describe("toggleSelected", () => {
  it("adds a model as the last column, and removes one, but never the last", () => {
    assert.deepEqual(toggleSelected([""], "b", true), ["", "b"]);
    assert.deepEqual(toggleSelected(["", "b"], "b", true), ["", "b"]);
    assert.deepEqual(toggleSelected(["", "b"], "", false), ["b"]);
    assert.deepEqual(toggleSelected(["b"], "b", false), ["b"]);
  });

  it("takes no more than MAX_COLUMNS", () => {
    const full = ["a", "b", "c", "d"].slice(0, MAX_COLUMNS);
    assert.deepEqual(toggleSelected(full, "e", true), full);
  });
});

describe("keyFor and turnsOf", () => {
  it("maps a loaded column to this server's models", () => {
    assert.equal(keyFor("sft-run", true, "sft-run"), DEFAULT_KEY);
    assert.equal(keyFor("sft-run", false, "sft-run"), DEFAULT_KEY); // this server's own, whatever it was there
    assert.equal(keyFor("base-run", true, "sft-run"), "base-run"); // the other server's own is a model here
    assert.equal(keyFor(null, false, "sft-run"), DEFAULT_KEY);
    assert.equal(keyFor("x", true, null), DEFAULT_KEY); // no /info: the own model is the own model
  });

  it("pairs questions with their answers; an unanswered one has none", () => {
    const a = { role: "assistant", content: "A" };
    assert.deepEqual(turnsOf([{ role: "user", content: "Q" }, a, { role: "user", content: "Q2" }]),
      [{ user: "Q", answer: a }, { user: "Q2", answer: null }]);
  });
});
