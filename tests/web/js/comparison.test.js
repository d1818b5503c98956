// web/chat/comparison.js: a comparison's JSON file written and checked whole on the way back,
// with errors that name the place and the reason.
"use strict";

const assert = require("node:assert/strict");
const { describe, it } = require("node:test");

const { FORMAT, ComparisonError, exportComparison, isComparison, readComparison } = require("../../../web/chat/comparison.js");

const TOKENS = [
  { id: 5, text: "Hi", logprob: -0.1, special: false, top: [{ id: 5, text: "Hi", logprob: -0.1, special: false }] },
  { id: 0, text: "<|endoftext|>", logprob: -0.3, special: true, top: [] },
];
const COLUMNS = [
  { model: "sft-run", own: true, messages: [
    { role: "user", content: "Say hi." },
    { role: "assistant", content: "Hi", meta: { tokens: 2, tokens_per_s: 8, finish_reason: "eos_token" }, tokens: TOKENS },
  ] },
  { model: "base-run", own: false, messages: [
    { role: "user", content: "Say hi." },
    { role: "assistant", content: "<b>x</b> | y", meta: { tokens: 4, finish_reason: "length" } },
  ] },
];
const NOW = new Date("2025-01-02T03:04:05.678Z");

function exported() {
  return JSON.parse(JSON.stringify(exportComparison({ server: "http://h:1", columns: COLUMNS, settings: { system: "" }, now: NOW }).doc));
}

// The error readComparison throws for `doc` changed by `change`.
function errorFor(change) {
  const doc = exported();
  change(doc);
  try {
    readComparison(doc);
  } catch (e) {
    assert.ok(e instanceof ComparisonError, e);
    return e.message;
  }
  assert.fail("accepted");
}

describe("exportComparison", () => {
  it("writes each column's model and conversation, tokens included, and reads back the same", () => {
    const { doc, filename } = exportComparison({ server: "http://h:1", columns: COLUMNS, settings: { system: "" }, now: NOW });
    assert.equal(filename, "comparison-2025-01-02T03-04-05-678Z.json");
    assert.equal(doc.format, FORMAT);
    assert.equal(doc.version, 1);
    assert.equal(isComparison(doc), true);
    assert.deepEqual(readComparison(JSON.parse(JSON.stringify(doc))), { columns: COLUMNS, settings: { system: "" } });
  });

  it("is not mistaken for a chat export, nor a chat export for it", () => {
    assert.equal(isComparison({ format: "tinycloud-chat", messages: [] }), false);
    assert.equal(isComparison([{ format: FORMAT }]), false);
  });
});

describe("readComparison refuses, naming the place and the reason", () => {
  const cases = [
    ["a newer version", (d) => { d.version = 2; }, /^version is 2, newer than this page reads \(1\)/],
    ["a version that is not one", (d) => { d.version = "1"; }, /^version is "1"; it must be 1\.$/],
    ["no columns", (d) => { d.columns = []; }, /^columns must be a list of 1 to 4 columns/],
    ["too many columns", (d) => { d.columns = Array(5).fill(d.columns[0]); }, /^columns must be a list of 1 to 4/],
    ["a column that is not an object", (d) => { d.columns[1] = "x"; }, /^columns\[1\] is "x"; a column is/],
    ["a model that is not an id", (d) => { d.columns[0].model = 7; }, /^columns\[0\]\.model is 7; it must be the model's id/],
    ["a blank model", (d) => { d.columns[0].model = " "; }, /^columns\[0\]\.model is " "/],
    ["the same model twice", (d) => { d.columns[1].model = "sft-run"; }, /^columns\[1\]\.model is "sft-run" again; each model has one column\.$/],
    ["own that is not a boolean", (d) => { d.columns[1].own = "no"; }, /^columns\[1\]\.own is "no"; it must be true or false\.$/],
    ["messages that are not a list", (d) => { d.columns[1].messages = {}; }, /^columns\[1\]\.messages must be a list of messages\.$/],
    ["a bad role", (d) => { d.columns[1].messages[0].role = "bot"; }, /^columns\[1\]\.messages\[0\]\.role is "bot"; it must be "user" or "assistant"\.$/],
    ["a missing content", (d) => { delete d.columns[0].messages[1].content; }, /^columns\[0\]\.messages\[1\]\.content is missing; it must be the message's text\.$/],
    ["meta that is not an object", (d) => { d.columns[0].messages[1].meta = [1]; }, /^columns\[0\]\.messages\[1\]\.meta must be an object/],
    ["tokens on a question", (d) => { d.columns[0].messages[0].tokens = []; }, /^columns\[0\]\.messages\[0\]\.tokens belongs to answers only\.$/],
    ["a token without text", (d) => { delete d.columns[0].messages[1].tokens[1].text; }, /^columns\[0\]\.messages\[1\]\.tokens\[1\]\.text is missing/],
    ["a positive logprob", (d) => { d.columns[0].messages[1].tokens[0].logprob = 0.5; }, /^columns\[0\]\.messages\[1\]\.tokens\[0\]\.logprob is 0\.5; it must be a log-probability/],
    ["a bad alternative", (d) => { d.columns[0].messages[1].tokens[0].top[0] = null; }, /^columns\[0\]\.messages\[1\]\.tokens\[0\]\.top\[0\] is null; a token is/],
    ["settings that are not an object", (d) => { d.settings = "hot"; }, /^settings must be an object/],
  ];
  for (const [what, change, expected] of cases) {
    it(what, () => assert.match(errorFor(change), expected));
  }

  it("a file that is not a comparison at all", () => {
    assert.throws(() => readComparison({ messages: [] }), /^Error: the file is not a comparison|the file is not a comparison/);
  });
});

describe("readComparison keeps what the page can show, and only that", () => {
  it("keeps an answer's known statistics as numbers, and nothing else", () => {
    const doc = exported();
    doc.columns[1].messages[1].meta = { tokens: 4, finish_reason: "length", evil: "<script>", tokens_per_s: "fast" };
    assert.deepEqual(readComparison(doc).columns[1].messages[1].meta, { tokens: 4, finish_reason: "length" });
  });

  it("takes a column whose model is null (the server's own, unnamed)", () => {
    const doc = exported();
    doc.columns[0].model = null;
    assert.equal(readComparison(doc).columns[0].model, null);
  });
});
