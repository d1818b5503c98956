// The prompt: the conversation written in the fine-tune's own format (remote/jobs/prompts.py owns
// it; the page gets it from /info or from the rendered config), fitted into the model's context.
(function (exports) {
  "use strict";

  const FORMAT_FIELDS = ["system", "separator", "user_prefix", "user_suffix", "eos", "stop"];
  // Used only when neither the server's /info nor the rendered page knows the model's format.
  const PLAIN_FORMAT = Object.freeze({
    system: "", separator: "\n", user_prefix: "User: ", user_suffix: "\nAssistant:", eos: "", stop: "User:",
  });
  const MIN_ANSWER_TOKENS = 16; // below this, shrinking the answer to fit is pointless: let the server say no
  const DEFAULT_BYTES_PER_TOKEN = 2.5; // until the server tells us better (GPT-2 on English: ~4)

  function validFormat(f) {
    return Boolean(f) && typeof f === "object" && typeof f.user_prefix === "string" &&
      typeof f.user_suffix === "string" &&
      FORMAT_FIELDS.every((k) => f[k] === undefined || f[k] === null || typeof f[k] === "string");
  }

  // The format in use and where it came from: the server's /info first (it knows the model it
  // serves), then the one rendered into the page, then a plain User:/Assistant: fallback.
  function chooseFormat(fromInfo, rendered) {
    if (validFormat(fromInfo)) {
      return { format: { ...PLAIN_FORMAT, system: "", ...fromInfo }, source: "from the server (/info)" };
    }
    if (validFormat(rendered)) {
      return { format: { ...PLAIN_FORMAT, system: "", ...rendered }, source: "rendered into this page" };
    }
    return { format: PLAIN_FORMAT, source: "plain fallback (User:/Assistant:)" };
  }

  // Pair past messages into (user, assistant) turns; an unanswered message keeps an empty reply.
  function pairTurns(messages) {
    const turns = [];
    for (const m of messages) {
      if (m.role === "user") turns.push({ user: m.content, assistant: "" });
      else if (m.role === "assistant" && turns.length && turns[turns.length - 1].assistant === "") {
        turns[turns.length - 1].assistant = m.content;
      }
    }
    return turns;
  }

  // system + separator + (user_prefix + user + user_suffix + reply + eos + separator)*
  // + user_prefix + newest + user_suffix: what the fine-tune's chat template renders.
  function buildPrompt(format, system, turns, newest) {
    const f = { separator: "", eos: "", ...format };
    let prompt = system ? system + f.separator : "";
    for (const t of turns) {
      prompt += f.user_prefix + t.user.trim() + f.user_suffix + t.assistant.trim() + (f.eos || "") + f.separator;
    }
    return prompt + f.user_prefix + newest.trim() + f.user_suffix;
  }

  function utf8Length(text) {
    return new TextEncoder().encode(text).length;
  }

  // Without /tokenize, count by bytes: byte-level BPE never needs more tokens than bytes, and
  // GPT-2 averages ~4 bytes a token on English. Each answer's input_length (and a 422's counts)
  // teaches the estimator this model's real ratio (the smallest seen); 10% slack keeps it on the
  // safe side.
  function createTokenEstimator() {
    const estimator = {
      bytesPerToken: 0, // learned from the server's token counts; 0 = not yet
      estimate(text) {
        const ratio = estimator.bytesPerToken ? estimator.bytesPerToken * 0.9 : DEFAULT_BYTES_PER_TOKEN;
        return Math.ceil(utf8Length(text) / ratio);
      },
      learn(prompt, tokens) {
        if (!(tokens > 0) || !prompt) return;
        const ratio = utf8Length(prompt) / tokens;
        estimator.bytesPerToken = estimator.bytesPerToken ? Math.min(estimator.bytesPerToken, ratio) : ratio;
      },
    };
    return estimator;
  }

  // Drop the oldest turns (never the newest message) until prompt + answer fits the model's
  // context (`info`: the server's /info; without max_total_tokens nothing is dropped). If even
  // the newest message alone leaves less room than max_new_tokens, the answer is capped to the
  // room left (unless that is under MIN_ANSWER_TOKENS). `count(prompt)` resolves to {n, exact}.
  async function fitPrompt(history, newest, settings, { format, info, count }) {
    const system = settings.system.trim() || format.system || "";
    const turns = pairTurns(history);
    const total = info && Number(info.max_total_tokens);
    const maxInput = (info && Number(info.max_input_tokens)) || total;
    let maxNew = settings.max_new_tokens;
    let dropped = 0;
    let prompt = buildPrompt(format, system, turns, newest);
    let counted = { n: 0, exact: false };
    if (total) {
      for (;;) {
        prompt = buildPrompt(format, system, turns.slice(dropped), newest);
        counted = await count(prompt);
        const fits = counted.n + maxNew <= total && counted.n <= maxInput;
        if (fits || dropped >= turns.length) break;
        dropped += 1;
      }
      const room = total - counted.n;
      if (counted.n + maxNew > total && room >= MIN_ANSWER_TOKENS) maxNew = room;
    }
    return { prompt, dropped, maxNew, requested: settings.max_new_tokens, promptTokens: counted, format };
  }

  exports.FORMAT_FIELDS = FORMAT_FIELDS;
  exports.PLAIN_FORMAT = PLAIN_FORMAT;
  exports.MIN_ANSWER_TOKENS = MIN_ANSWER_TOKENS;
  exports.DEFAULT_BYTES_PER_TOKEN = DEFAULT_BYTES_PER_TOKEN;
  exports.validFormat = validFormat;
  exports.chooseFormat = chooseFormat;
  exports.pairTurns = pairTurns;
  exports.buildPrompt = buildPrompt;
  exports.utf8Length = utf8Length;
  exports.createTokenEstimator = createTokenEstimator;
  exports.fitPrompt = fitPrompt;
})(typeof tinycloud === "object" ? (tinycloud.prompt = {}) : module.exports);
