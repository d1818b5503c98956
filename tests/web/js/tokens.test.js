// web/chat/tokens.js: reading TGI's top_tokens from stream events, probabilities, the colour
// buckets, and how a token and its alternatives are written out for the eye and for a screen
// reader.
"use strict";

const assert = require("node:assert/strict");
const { describe, it } = require("node:test");

const {
  BUCKETS, MAX_TOP_TOKENS, toToken, parseTopTokens, tokenFromEvent, restoreToken, probability, bucketOf,
  formatProbability, showText, rankOf, tokenLabel,
} = require("../../../web/chat/tokens.js");

// One event as TGI 3.3 streams it with top_n_tokens: 3 (router/src/lib.rs StreamResponse).
const EVENT = {
  index: 1,
  token: { id: 262, text: " the", logprob: -0.6931, special: false },
  top_tokens: [
    { id: 257, text: " a", logprob: -1.2, special: false },
    { id: 262, text: " the", logprob: -0.6931, special: false },
    { id: 198, text: "\n", logprob: -2.3, special: false },
  ],
  generated_text: null,
  details: null,
};

describe("tokenFromEvent", () => {
  it("keeps the token and its alternatives, most likely first", () => {
    const t = tokenFromEvent(EVENT);
    assert.deepEqual(t, {
      id: 262, text: " the", logprob: -0.6931, special: false,
      top: [
        { id: 262, text: " the", logprob: -0.6931, special: false },
        { id: 257, text: " a", logprob: -1.2, special: false },
        { id: 198, text: "\n", logprob: -2.3, special: false },
      ],
    });
  });

  it("has no alternatives where the event has no top_tokens (TGI leaves the field out)", () => {
    const without = { ...EVENT };
    delete without.top_tokens;
    assert.deepEqual(tokenFromEvent(without).top, []);
    assert.deepEqual(tokenFromEvent({ ...EVENT, top_tokens: null }).top, []);
    assert.deepEqual(tokenFromEvent({ ...EVENT, top_tokens: "five" }).top, []);
  });

  it("is null for an event without a token", () => {
    assert.equal(tokenFromEvent({ generated_text: "x" }), null);
    assert.equal(tokenFromEvent({ token: { id: 1 } }), null);
    assert.equal(tokenFromEvent(null), null);
  });

  it("drops alternatives that are not tokens, and keeps no more than the page asks for", () => {
    const many = Array.from({ length: 9 }, (_, i) => ({ id: i, text: `t${i}`, logprob: -i, special: false }));
    const top = tokenFromEvent({ ...EVENT, top_tokens: [null, 3, { text: 7 }, ...many] }).top;
    assert.equal(top.length, MAX_TOP_TOKENS);
    assert.deepEqual(top.map((t) => t.text), ["t0", "t1", "t2", "t3", "t4"]);
  });
});

describe("toToken", () => {
  it("keeps a logprob only when it is a finite number <= 0", () => {
    for (const bad of [null, undefined, "0.5", 0.5, Infinity, -Infinity, NaN]) {
      assert.equal(toToken({ text: "x", logprob: bad }).logprob, null, String(bad));
    }
    assert.equal(toToken({ text: "x", logprob: 0 }).logprob, 0);
    assert.equal(toToken({ text: "x", logprob: -3.5 }).logprob, -3.5);
  });

  it("takes id and special only when they are what TGI sends", () => {
    assert.deepEqual(toToken({ id: "7", text: "x", logprob: -1, special: "yes" }), { id: null, text: "x", logprob: -1, special: false });
    assert.equal(toToken({ id: 0, text: "", logprob: -1, special: true }).special, true);
  });

  it("sorts alternatives without a logprob last", () => {
    const list = parseTopTokens([{ text: "a", logprob: null }, { text: "b", logprob: -5 }, { text: "c", logprob: -0.1 }]);
    assert.deepEqual(list.map((t) => t.text), ["c", "b", "a"]);
  });

  it("restores a stored record as tokenFromEvent made it", () => {
    const made = tokenFromEvent(EVENT);
    assert.deepEqual(restoreToken(JSON.parse(JSON.stringify(made))), made);
    assert.equal(restoreToken({ top: [] }), null);
  });
});

describe("probability buckets", () => {
  it("puts each probability in the first bucket whose floor it reaches", () => {
    const cases = [[1, 0], [0.9, 0], [0.8999, 1], [0.6, 1], [0.5999, 2], [0.3, 2], [0.2999, 3], [0.1, 3], [0.0999, 4], [0, 4]];
    for (const [p, bucket] of cases) assert.equal(bucketOf(p), bucket, String(p));
    assert.equal(bucketOf(null), -1);
    assert.equal(bucketOf(NaN), -1);
  });

  it("has floors that fall to 0, and a label for each", () => {
    const floors = BUCKETS.map((b) => b.min);
    assert.deepEqual([...floors].sort((a, b) => b - a), floors);
    assert.equal(floors.at(-1), 0);
    assert.ok(BUCKETS.every((b) => typeof b.label === "string" && b.label));
  });

  it("turns a logprob into a probability", () => {
    assert.equal(probability(0), 1);
    assert.ok(Math.abs(probability(Math.log(0.25)) - 0.25) < 1e-12);
    assert.equal(probability(null), null);
    assert.equal(bucketOf(probability(EVENT.token.logprob)), 2); // e^-0.6931 = 0.5
  });
});

describe("writing tokens out", () => {
  it("formats probabilities", () => {
    assert.equal(formatProbability(0.5), "50.0%");
    assert.equal(formatProbability(0.99999), "100%");
    assert.equal(formatProbability(0.0004), "<0.1%");
    assert.equal(formatProbability(null), "not reported");
  });

  it("makes whitespace and control characters visible, quoted", () => {
    assert.equal(showText(" the"), "“ the”");
    assert.equal(showText("\n\t\r"), "“↵⇥␍”");
    assert.equal(showText("a\u0000b"), "“a�b”");
    assert.equal(showText(""), "“”");
  });

  it("ranks the chosen token among the alternatives, by id (or text without ids)", () => {
    assert.equal(rankOf(tokenFromEvent(EVENT)), 1);
    assert.equal(rankOf({ id: 9, text: "z", top: tokenFromEvent(EVENT).top }), 0); // sampled outside the top n
    assert.equal(rankOf({ id: null, text: " a", top: [{ id: null, text: " the" }, { id: null, text: " a" }] }), 2);
    assert.equal(rankOf({ id: 1, text: "x", top: [] }), 0);
  });

  it("names a token for a screen reader: text, probability, what was weighed", () => {
    assert.equal(tokenLabel(tokenFromEvent(EVENT)),
      "“ the”, 50.0%; weighed “ the” 50.0%, “ a” 30.1%, “↵” 10.0%");
    assert.equal(tokenLabel({ text: "<|endoftext|>", logprob: null, special: true, top: [] }),
      "“<|endoftext|>” (special), not reported");
  });
});
