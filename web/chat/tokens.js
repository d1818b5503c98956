// Look inside: the tokens of an answer, each with the probability the model gave it and the
// alternatives it weighed (TGI's `top_n_tokens`). A stream event carries
//   {"token": {id, text, logprob, special}, "top_tokens": [{id, text, logprob, special}, ...]}
// (`top_tokens` is left out when empty, as TGI does); this module turns that into plain records,
// sorts the alternatives, and says how to show them. Nothing here touches the page.
(function (exports) {
  "use strict";

  const MAX_TOP_TOKENS = 5; // TGI's default --max-top-n-tokens; the page never asks for more
  const KEEP_TOP_TOKENS = 10; // what a loaded file may carry per token, at most
  // Probability buckets for colouring, highest first: a token's bucket is the first whose `min`
  // its probability reaches. chat.css colours `.tok[data-p="<index>"]`; the legend uses `label`.
  const BUCKETS = Object.freeze([
    Object.freeze({ min: 0.9, label: "90% or more" }),
    Object.freeze({ min: 0.6, label: "60–90%" }),
    Object.freeze({ min: 0.3, label: "30–60%" }),
    Object.freeze({ min: 0.1, label: "10–30%" }),
    Object.freeze({ min: 0, label: "under 10%" }),
  ]);

  const finite = (x) => typeof x === "number" && Number.isFinite(x);

  // One token as the server sent it, or null when it is not one. A logprob that is not a finite
  // number <= 0 (null, -Infinity serialized as null, a string) is kept as null: "not reported".
  function toToken(raw) {
    if (!raw || typeof raw !== "object" || typeof raw.text !== "string") return null;
    const id = Number.isInteger(raw.id) ? raw.id : null;
    const logprob = finite(raw.logprob) && raw.logprob <= 0 ? raw.logprob : null;
    return { id, text: raw.text, logprob, special: raw.special === true };
  }

  // The alternatives of one step, most likely first; entries that are not tokens are dropped and
  // at most `max` kept. Not an array (the field left out): no alternatives.
  function parseTopTokens(raw, max = KEEP_TOP_TOKENS) {
    if (!Array.isArray(raw)) return [];
    const list = raw.map(toToken).filter(Boolean);
    list.sort((a, b) => (b.logprob ?? -Infinity) - (a.logprob ?? -Infinity));
    return list.slice(0, max);
  }

  // The record the page keeps for one generated token of a stream event (`data`: the event's
  // parsed JSON), or null for an event without a token.
  function tokenFromEvent(data) {
    const token = data && toToken(data.token);
    if (!token) return null;
    return { ...token, top: parseTopTokens(data.top_tokens, MAX_TOP_TOKENS) };
  }

  // A stored or loaded token record back, or null: what tokenFromEvent would have made.
  function restoreToken(raw) {
    const token = toToken(raw);
    if (!token) return null;
    return { ...token, top: parseTopTokens(raw.top) };
  }

  function probability(logprob) {
    return finite(logprob) ? Math.exp(logprob) : null;
  }

  // The bucket index for a probability, -1 when there is none.
  function bucketOf(p) {
    if (!finite(p)) return -1;
    return BUCKETS.findIndex((b) => p >= b.min);
  }

  function formatProbability(p) {
    if (!finite(p)) return "not reported";
    if (p >= 0.9995) return "100%";
    if (p < 0.001) return "<0.1%";
    return (p * 100).toFixed(1) + "%";
  }

  // A token's text made visible: quoted, with its whitespace and control characters named, so
  // " the", "\n" and "" can be told apart in a list.
  function showText(text) {
    const named = text.replace(/\n/g, "↵").replace(/\r/g, "␍").replace(/\t/g, "⇥")
      // eslint-disable-next-line no-control-regex -- naming control characters is the point
      .replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]/g, "�");
    return "“" + named + "”";
  }

  // 1-based place of the chosen token among the alternatives; 0 when it is not among them.
  function rankOf(token) {
    if (!token.top || !token.top.length) return 0;
    const i = token.top.findIndex((t) =>
      token.id !== null && t.id !== null ? t.id === token.id : t.text === token.text);
    return i + 1;
  }

  // A token's accessible name: its text, its probability and its alternatives in words.
  function tokenLabel(token) {
    let label = `${showText(token.text)}${token.special ? " (special)" : ""}, ` +
      formatProbability(probability(token.logprob));
    if (token.top && token.top.length) {
      const alts = token.top.map((t) => `${showText(t.text)} ${formatProbability(probability(t.logprob))}`);
      label += "; weighed " + alts.join(", ");
    }
    return label;
  }

  exports.MAX_TOP_TOKENS = MAX_TOP_TOKENS;
  exports.KEEP_TOP_TOKENS = KEEP_TOP_TOKENS;
  exports.BUCKETS = BUCKETS;
  exports.toToken = toToken;
  exports.parseTopTokens = parseTopTokens;
  exports.tokenFromEvent = tokenFromEvent;
  exports.restoreToken = restoreToken;
  exports.probability = probability;
  exports.bucketOf = bucketOf;
  exports.formatProbability = formatProbability;
  exports.showText = showText;
  exports.rankOf = rankOf;
  exports.tokenLabel = tokenLabel;
})(typeof tinycloud === "object" ? (tinycloud.tokens = {}) : module.exports);
