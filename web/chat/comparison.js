// A comparison as a file: what Export JSON writes when the page talks to more than one model
// (or to a model that is not the server's own), and what Load JSON… checks before it takes one
// back. Checking is strict: a file that is not exactly a comparison is refused with the place
// and the reason ("columns[1].messages[2].role is "bot"; …"), and nothing on the page changes.
(function (exports, transcript, cols) {
  "use strict";

  const FORMAT = "tinycloud-comparison";
  const VERSION = 1;
  const { MAX_COLUMNS, MAX_ID_LENGTH } = cols;

  const isObject = (x) => Boolean(x) && typeof x === "object" && !Array.isArray(x);
  const isLogprob = (x) => x === null || x === undefined || (typeof x === "number" && Number.isFinite(x) && x <= 0);
  const shown = (x) => (x === undefined ? "missing" : JSON.stringify(x).slice(0, 60));

  class ComparisonError extends Error {}

  function fail(where, what) {
    throw new ComparisonError(`${where} ${what}`);
  }

  // What Export JSON writes for a comparison, and the file name it suggests. `columns`:
  // [{model: id or null, own: whether it is the server's own model, messages}].
  function exportComparison({ server, columns, settings, now = new Date() }) {
    const doc = {
      format: FORMAT,
      version: VERSION,
      exported_at: now.toISOString(),
      server,
      settings,
      columns: columns.map((c) => ({
        model: c.model,
        own: Boolean(c.own),
        messages: c.messages.map((m) => transcript.keptMessage(m.role, m.content, m.meta, m.tokens)),
      })),
    };
    return { doc, filename: `comparison-${doc.exported_at.replace(/[:.]/g, "-")}.json` };
  }

  function isComparison(value) {
    return isObject(value) && value.format === FORMAT;
  }

  function checkToken(t, where) {
    if (!isObject(t)) fail(where, `is ${shown(t)}; a token is {"text", "logprob", "id", "special"}.`);
    if (typeof t.text !== "string") fail(where + ".text", `is ${shown(t.text)}; it must be the token's text.`);
    if (!isLogprob(t.logprob)) fail(where + ".logprob", `is ${shown(t.logprob)}; it must be a log-probability (a number <= 0) or null.`);
    if (t.top !== undefined) {
      if (!Array.isArray(t.top)) fail(where + ".top", "must be a list of the alternatives (tokens).");
      t.top.forEach((alt, i) => checkToken(alt, `${where}.top[${i}]`));
    }
  }

  function checkMessage(m, where) {
    if (!isObject(m)) fail(where, `is ${shown(m)}; a message is {"role", "content"}.`);
    if (m.role !== "user" && m.role !== "assistant") fail(where + ".role", `is ${shown(m.role)}; it must be "user" or "assistant".`);
    if (typeof m.content !== "string") fail(where + ".content", `is ${shown(m.content)}; it must be the message's text.`);
    if (m.meta !== undefined && !isObject(m.meta)) fail(where + ".meta", "must be an object of the answer's statistics.");
    if (m.tokens !== undefined) {
      if (m.role !== "assistant") fail(where + ".tokens", "belongs to answers only.");
      if (!Array.isArray(m.tokens)) fail(where + ".tokens", "must be a list of the answer's tokens.");
      m.tokens.forEach((t, i) => checkToken(t, `${where}.tokens[${i}]`));
    }
    const meta = m.meta ? transcript.cleanMeta(m.meta) : undefined;
    return transcript.keptMessage(m.role, m.content, meta, transcript.cleanTokens(m.tokens));
  }

  // A loaded comparison, checked whole: {columns: [{model, own, messages}], settings}, or a
  // ComparisonError that names the first thing wrong and where.
  function readComparison(value) {
    if (!isComparison(value)) fail("the file", `is not a comparison (its "format" is not "${FORMAT}").`);
    if (value.version !== VERSION) {
      const newer = Number.isInteger(value.version) && value.version > VERSION;
      fail("version", newer
        ? `is ${value.version}, newer than this page reads (${VERSION}); render the page again from an up-to-date tinycloud.`
        : `is ${shown(value.version)}; it must be ${VERSION}.`);
    }
    if (!Array.isArray(value.columns) || value.columns.length < 1 || value.columns.length > MAX_COLUMNS) {
      fail("columns", `must be a list of 1 to ${MAX_COLUMNS} columns, one per model; it is ${shown(value.columns)}.`);
    }
    const seen = new Set();
    const columns = value.columns.map((c, i) => {
      const where = `columns[${i}]`;
      if (!isObject(c)) fail(where, `is ${shown(c)}; a column is {"model", "own", "messages"}.`);
      const badId = typeof c.model !== "string" || !c.model.trim() || c.model.length > MAX_ID_LENGTH;
      if (c.model !== null && badId) fail(where + ".model", `is ${shown(c.model)}; it must be the model's id (as /v1/models lists it) or null.`);
      if (c.own !== undefined && typeof c.own !== "boolean") fail(where + ".own", `is ${shown(c.own)}; it must be true or false.`);
      const id = c.model === null ? "(the server's own model)" : c.model;
      if (seen.has(id)) fail(where + ".model", `is ${shown(c.model)} again; each model has one column.`);
      seen.add(id);
      if (!Array.isArray(c.messages)) fail(where + ".messages", "must be a list of messages.");
      const messages = c.messages.map((m, j) => checkMessage(m, `${where}.messages[${j}]`));
      return { model: c.model, own: c.own === true, messages };
    });
    if (value.settings !== undefined && !isObject(value.settings)) fail("settings", "must be an object of the settings used.");
    return { columns, settings: value.settings ?? null };
  }

  exports.FORMAT = FORMAT;
  exports.VERSION = VERSION;
  exports.ComparisonError = ComparisonError;
  exports.exportComparison = exportComparison;
  exports.isComparison = isComparison;
  exports.readComparison = readComparison;
})(...(typeof tinycloud === "object"
  ? [(tinycloud.comparison = {}), tinycloud.transcript, tinycloud.columns]
  : [module.exports, require("./transcript.js"), require("./columns.js")]));
