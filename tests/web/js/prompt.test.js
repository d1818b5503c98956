// web/chat/prompt.js: the format, the prompt, and what is kept or left out under the token budget.
"use strict";

const assert = require("node:assert/strict");
const { describe, it } = require("node:test");

const {
  PLAIN_FORMAT, MIN_ANSWER_TOKENS, DEFAULT_BYTES_PER_TOKEN,
  chooseFormat, pairTurns, buildPrompt, utf8Length, createTokenEstimator, fitPrompt,
} = require("../../../web/chat/prompt.js");

// A format whose pieces are easy to count: one character a token with `countChars` below.
const FORMAT = { system: "S", separator: "|", user_prefix: "<u>", user_suffix: "<a>", eos: "$", stop: "<u>" };
const countChars = async (text) => ({ n: text.length, exact: true });
const settings = (extra = {}) => ({ max_new_tokens: 10, system: "", ...extra });
const history = (n) => {
  const out = [];
  for (let i = 1; i <= n; i += 1) out.push({ role: "user", content: `q${i}` }, { role: "assistant", content: `a${i}` });
  return out;
};
const turnText = (i) => `<u>q${i}<a>a${i}$|`; // 12 characters per turn for i < 10

describe("chooseFormat", () => {
  it("prefers the server's format, then the rendered one, then the plain fallback", () => {
    const rendered = { user_prefix: "R: ", user_suffix: "\nA:" };
    assert.deepEqual(chooseFormat(FORMAT, rendered), {
      format: FORMAT, source: "from the server (/info)",
    });
    assert.deepEqual(chooseFormat(null, rendered), {
      format: { ...PLAIN_FORMAT, system: "", ...rendered }, source: "rendered into this page",
    });
    assert.equal(chooseFormat(undefined, null).source, "plain fallback (User:/Assistant:)");
    assert.equal(chooseFormat(undefined, null).format, PLAIN_FORMAT);
  });

  it("passes over a format with a missing or non-string field", () => {
    assert.equal(chooseFormat({ user_prefix: "U" }, null).source, "plain fallback (User:/Assistant:)");
    assert.equal(chooseFormat({ ...FORMAT, eos: 5 }, FORMAT).source, "rendered into this page");
    assert.equal(chooseFormat("<u>", FORMAT).source, "rendered into this page");
    assert.equal(chooseFormat({ ...FORMAT, eos: null }, null).source, "from the server (/info)");
  });
});

describe("pairTurns and buildPrompt", () => {
  it("pairs each message with its answer; an unanswered one gets an empty answer", () => {
    const messages = [
      { role: "user", content: "q1" }, { role: "user", content: "q2" }, { role: "assistant", content: "a2" },
      { role: "assistant", content: "stray" }, { role: "system", content: "ignored" },
    ];
    assert.deepEqual(pairTurns(messages), [{ user: "q1", assistant: "" }, { user: "q2", assistant: "a2" }]);
  });

  it("writes system, turns and the newest message in the format, trimmed", () => {
    const turns = [{ user: " q1 ", assistant: "a1\n" }];
    assert.equal(buildPrompt(FORMAT, "S", turns, " new "), "S|<u>q1<a>a1$|<u>new<a>");
    assert.equal(buildPrompt(FORMAT, "", [], "new"), "<u>new<a>"); // no system: no separator
    const bare = { user_prefix: "U:", user_suffix: "A:" }; // separator and eos default to ""
    assert.equal(buildPrompt(bare, "S", turns, "x"), "SU:q1A:a1U:xA:");
  });
});

describe("createTokenEstimator", () => {
  it("counts UTF-8 bytes at 2.5 a token until it learns the model's ratio", () => {
    const tokens = createTokenEstimator();
    assert.equal(utf8Length("é🙂"), 6);
    assert.equal(tokens.estimate("x".repeat(10)), Math.ceil(10 / DEFAULT_BYTES_PER_TOKEN));
    tokens.learn("y".repeat(40), 10); // 4 bytes a token, estimated with 10% to spare
    assert.equal(tokens.bytesPerToken, 4);
    assert.equal(tokens.estimate("x".repeat(36)), 10);
    assert.equal(tokens.estimate("x".repeat(37)), 11);
  });

  it("keeps the smallest ratio seen and ignores counts that say nothing", () => {
    const tokens = createTokenEstimator();
    tokens.learn("y".repeat(40), 10);
    tokens.learn("y".repeat(30), 10); // 3: tighter, taken
    tokens.learn("y".repeat(60), 10); // 6: a looser ratio does not replace a tighter one
    for (const [prompt, n] of [["", 5], ["yy", 0], ["yy", -1], ["yy", NaN], ["yy", undefined]]) tokens.learn(prompt, n);
    assert.equal(tokens.bytesPerToken, 3);
  });
});

describe("fitPrompt", () => {
  const fit = (past, newest, values, info, count = countChars) =>
    fitPrompt(past, newest, values, { format: FORMAT, info, count });

  it("keeps the whole conversation when it fits", async () => {
    const r = await fit(history(2), "new", settings(), { max_total_tokens: 100 });
    assert.equal(r.prompt, "S|" + turnText(1) + turnText(2) + "<u>new<a>");
    assert.equal(r.dropped, 0);
    assert.equal(r.maxNew, 10);
    assert.equal(r.requested, 10);
    assert.deepEqual(r.promptTokens, { n: r.prompt.length, exact: true });
    assert.equal(r.format, FORMAT);
  });

  it("leaves out the oldest turns first, just enough for prompt + answer to fit", async () => {
    // 2 (system) + 12 per turn + 9 (newest) = 47 for three turns; the answer needs 10 more, so
    // 57 fits all, 45 fits two turns, 44 one.
    const info = { max_total_tokens: 44 };
    const r = await fit(history(3), "new", settings(), info);
    assert.equal(r.dropped, 2);
    assert.equal(r.prompt, "S|" + turnText(3) + "<u>new<a>");
    assert.ok(r.promptTokens.n + r.maxNew <= info.max_total_tokens);
    const one = await fit(history(3), "new", settings(), { max_total_tokens: 45 });
    assert.equal(one.dropped, 1); // exactly full fits
    assert.equal(one.prompt, "S|" + turnText(2) + turnText(3) + "<u>new<a>");
  });

  it("keeps the prompt within max_input_tokens too", async () => {
    const r = await fit(history(3), "new", settings(), { max_total_tokens: 1000, max_input_tokens: 30 });
    assert.equal(r.dropped, 2);
    assert.ok(r.promptTokens.n <= 30);
  });

  it("never leaves out the newest message, and caps the answer to the room left", async () => {
    const r = await fit(history(2), "n".repeat(40), settings({ max_new_tokens: 50 }), { max_total_tokens: 70 });
    assert.equal(r.dropped, 2);
    assert.ok(r.prompt.endsWith("<u>" + "n".repeat(40) + "<a>"));
    assert.equal(r.promptTokens.n, 2 + 46);
    assert.equal(r.maxNew, 70 - 48);
    assert.equal(r.requested, 50);
  });

  it("does not cap the answer below MIN_ANSWER_TOKENS: the server gets to refuse it", async () => {
    const room = MIN_ANSWER_TOKENS - 1;
    const r = await fit([], "n".repeat(40), settings({ max_new_tokens: 50 }), { max_total_tokens: 48 + room });
    assert.equal(r.maxNew, 50);
    const enough = await fit([], "n".repeat(40), settings({ max_new_tokens: 50 }), { max_total_tokens: 48 + room + 1 });
    assert.equal(enough.maxNew, MIN_ANSWER_TOKENS);
  });

  it("drops nothing and counts nothing when the server did not say its context", async () => {
    let calls = 0;
    const counting = async (text) => { calls += 1; return countChars(text); };
    for (const info of [null, {}, { max_total_tokens: "unknown" }]) {
      const r = await fit(history(50), "new", settings(), info, counting);
      assert.equal(r.dropped, 0);
      assert.deepEqual(r.promptTokens, { n: 0, exact: false });
    }
    assert.equal(calls, 0);
  });

  it("uses the system prompt from the settings, else the format's", async () => {
    const info = { max_total_tokens: 100 };
    assert.ok((await fit([], "q", settings({ system: "  Be brief. " }), info)).prompt.startsWith("Be brief.|"));
    assert.ok((await fit([], "q", settings({ system: "   " }), info)).prompt.startsWith("S|"));
  });

  it("counts with the given counter, as often as it takes, and keeps its exactness", async () => {
    const seen = [];
    const estimate = async (text) => { seen.push(text); return { n: text.length * 2, exact: false }; };
    const r = await fit(history(3), "new", settings(), { max_total_tokens: 80 }, estimate);
    assert.equal(seen.length, r.dropped + 1);
    assert.deepEqual(r.promptTokens, { n: r.prompt.length * 2, exact: false });
  });
});
