// Conversations as files: what Export JSON writes, and what Load JSON… (and the copy kept in the
// browser's storage) takes back.
(function (exports, tokens) {
  "use strict";

  const LOAD_HELP = 'Expected a conversation ({"messages": [{"role": "user", "content": "…"}, …]}, ' +
    'as Export writes) or a prompt ({"prompt": "…"}, {"inputs": "…"}, {"instruction": "…", "input": "…"}).';
  const META_NUMBERS = ["tokens", "tokens_per_s", "first_token_ms", "dropped", "shortened_to"];

  // Keeps an answer's known statistics, and only as numbers, so a loaded file cannot make the
  // page show anything but what it would have measured itself.
  function cleanMeta(meta) {
    const out = {};
    for (const k of META_NUMBERS) {
      if (typeof meta[k] === "number" && Number.isFinite(meta[k])) out[k] = meta[k];
    }
    if (typeof meta.finish_reason === "string") out.finish_reason = meta.finish_reason.slice(0, 40);
    return out;
  }

  // An answer's token records (tokens.js), the malformed ones left out; undefined for none.
  function cleanTokens(list) {
    if (!Array.isArray(list)) return undefined;
    const kept = list.map(tokens.restoreToken).filter(Boolean);
    return kept.length ? kept : undefined;
  }

  // One message as the page keeps it: role, content and, for an answer, its statistics and
  // tokens when it has them.
  function keptMessage(role, content, meta, tokenList) {
    return { role, content, ...(meta ? { meta } : {}), ...(tokenList ? { tokens: tokenList } : {}) };
  }

  // Returns {messages, system} for a conversation or {prompt} for a single prompt; throws an
  // Error that says what was wrong and what is expected.
  function interpretLoaded(value) {
    if (typeof value === "string") return { prompt: value };
    const list = Array.isArray(value) ? value : value && Array.isArray(value.messages) ? value.messages : null;
    if (list) {
      const messages = [];
      let system = null;
      list.forEach((m, i) => {
        if (!m || typeof m !== "object" || typeof m.content !== "string") {
          throw new Error(`message ${i + 1} has no text "content". ${LOAD_HELP}`);
        }
        if (m.role === "system") {
          system = m.content;
          return;
        }
        if (m.role !== "user" && m.role !== "assistant") {
          throw new Error(`message ${i + 1} has role ${JSON.stringify(m.role)}; use "user", "assistant" or "system".`);
        }
        const meta = m.meta && typeof m.meta === "object" ? cleanMeta(m.meta) : undefined;
        const kept = m.role === "assistant" ? cleanTokens(m.tokens) : undefined;
        messages.push(keptMessage(m.role, m.content, meta, kept));
      });
      return { messages, system };
    }
    if (value && typeof value === "object") {
      if (typeof value.prompt === "string") return { prompt: value.prompt };
      if (typeof value.inputs === "string") return { prompt: value.inputs };
      if (typeof value.instruction === "string") {
        const extra = typeof value.input === "string" && value.input.trim() ? "\n\n" + value.input.trim() : "";
        return { prompt: value.instruction.trim() + extra };
      }
    }
    throw new Error(LOAD_HELP);
  }

  // A loaded file's text: {prompt} for a .txt (or text/plain) file, else {value}: its JSON.
  function readFile(name, type, text) {
    if (/\.txt$/i.test(name) || type === "text/plain") return { prompt: text };
    try {
      return { value: JSON.parse(text) };
    } catch (e) {
      throw new Error(`it is not valid JSON (${e.message}).`);
    }
  }

  // A loaded file as a conversation or a prompt (interpretLoaded's answer).
  function interpretFile(name, type, text) {
    const read = readFile(name, type, text);
    return "prompt" in read ? read : interpretLoaded(read.value);
  }

  // The conversation kept in storage, or none when what is there is not one.
  function restoreConversation(saved) {
    try {
      return Array.isArray(saved) ? interpretLoaded(saved).messages : [];
    } catch {
      return [];
    }
  }

  // What Export JSON writes, and the file name it suggests.
  function exportDocument({ server, model, format, source, settings, messages, now = new Date() }) {
    const doc = {
      format: "tinycloud-chat",
      version: 1,
      exported_at: now.toISOString(),
      server,
      model,
      prompt_format: { ...format, source },
      settings,
      messages: messages.map((m) => keptMessage(m.role, m.content, m.meta, m.tokens)),
    };
    return { doc, filename: `chat-${doc.exported_at.replace(/[:.]/g, "-")}.json` };
  }

  exports.LOAD_HELP = LOAD_HELP;
  exports.cleanMeta = cleanMeta;
  exports.cleanTokens = cleanTokens;
  exports.keptMessage = keptMessage;
  exports.interpretLoaded = interpretLoaded;
  exports.readFile = readFile;
  exports.interpretFile = interpretFile;
  exports.restoreConversation = restoreConversation;
  exports.exportDocument = exportDocument;
})(...(typeof tinycloud === "object"
  ? [(tinycloud.transcript = {}), tinycloud.tokens]
  : [module.exports, require("./tokens.js")]));
