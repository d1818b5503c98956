// Export Markdown: the side-by-side transcript as one table, for a report. Every piece of model,
// user or server text is escaped so that it renders as the text it is: no emphasis, link, HTML,
// math or table cell boundary can come out of a reply (a `|` would end its cell; a `<b>` would
// be markup in most renderers). The only markup in the result is the page's own.
(function (exports, columns, view) {
  "use strict";

  // What CommonMark and GitHub's extensions read inside a line: emphasis, code, links and
  // images, autolinks and HTML, entities, strikethrough, math, table pipes, and the backslash
  // itself. Block syntax (#, >, lists) cannot start inside a table cell or after the page's own
  // text at the start of a line, so it needs no escape there.
  const INLINE = /[\\`*_[\]()<>!&|~$]/g;

  function escapeInline(text) {
    return String(text).replace(INLINE, "\\$&");
  }

  // One table cell: escaped, line breaks as <br> (a cell is one line), tabs as spaces, and a
  // visible placeholder for a cell that would otherwise be empty.
  function cell(text, empty = "*(no text)*") {
    const lines = String(text).replace(/\r\n?/g, "\n").replace(/\t/g, " ").split("\n");
    const body = lines.map((l) => escapeInline(l).trim()).join("<br>");
    return body.replace(/(<br>)+$/, "").replace(/^(<br>)+/, "") || empty;
  }

  function answerCell(answer) {
    if (!answer) return "—";
    const meta = answer.meta || {};
    const stats = [meta.finish_reason, view.metaText(meta)].filter(Boolean).join(" · ");
    const text = cell(answer.content);
    return stats ? `${text}<br><br>*${escapeInline(stats)}*` : text;
  }

  function settingsLine(s) {
    if (!s) return "";
    const parts = [
      `max new tokens ${s.max_new_tokens}`,
      s.temperature > 0 ? `temperature ${s.temperature}` : "greedy (temperature 0)",
      `top-p ${s.top_p}`, `top-k ${s.top_k}`, `repetition penalty ${s.repetition_penalty}`,
      s.system && s.system.trim()
        ? `system prompt “${s.system.trim().replace(/\s+/g, " ")}”` : "the model's own system prompt",
    ];
    return parts.join(" · ");
  }

  // The transcript: a header (server, time, settings), then one row per turn with the user's
  // message and each column's answer with its finish reason and statistics. `cols`: [{name,
  // messages}]. Where a column's question differs from the first column's, its cell says so.
  function comparisonMarkdown({ server, cols, settings, now = new Date() }) {
    const turns = cols.map((c) => columns.turnsOf(c.messages));
    const rows = Math.max(0, ...turns.map((t) => t.length));
    const out = [
      "# Comparison from tinycloud chat",
      "",
      `- Server: ${escapeInline(server)}`,
      `- Exported: ${now.toISOString()}`,
    ];
    if (settings) out.push(`- Settings: ${escapeInline(settingsLine(settings))}`);
    out.push("", `| Turn | You | ${cols.map((c) => cell(c.name)).join(" | ")} |`);
    out.push(`| ---: | --- | ${cols.map(() => "---").join(" | ")} |`);
    for (let i = 0; i < rows; i += 1) {
      const asked = turns.map((t) => (t[i] ? t[i].user : null));
      const question = asked.find((q) => q !== null);
      const answers = turns.map((t, c) => {
        if (!t[i]) return "—";
        const own = asked[c] !== question ? `**You:** ${cell(asked[c])}<br><br>` : "";
        return own + answerCell(t[i].answer);
      });
      out.push(`| ${i + 1} | ${cell(question)} | ${answers.join(" | ")} |`);
    }
    if (!rows) out.push(`| — | — | ${cols.map(() => "—").join(" | ")} |`);
    return out.join("\n") + "\n";
  }

  exports.escapeInline = escapeInline;
  exports.cell = cell;
  exports.comparisonMarkdown = comparisonMarkdown;
})(...(typeof tinycloud === "object"
  ? [(tinycloud.markdown = {}), tinycloud.columns, tinycloud.view]
  : [module.exports, require("./columns.js"), require("./view.js")]));
