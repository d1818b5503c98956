// web/chat/markdown.js: Export Markdown's table, with every piece of text escaped so it renders as
// itself. (tests/web/test_js.py also renders an export with a real Markdown parser and checks each
// cell's text.)
"use strict";

const assert = require("node:assert/strict");
const { describe, it } = require("node:test");

const { escapeInline, cell, comparisonMarkdown } = require("../../../web/chat/markdown.js");

const NASTY = "a|b *em* _u_ `code` [link](http://x) ![img](y) <b>bold</b> &amp; ~~s~~ $x$ \\ end";

// A table row's cells: split on the pipes that are not escaped.
function cellsOf(row) {
  return row.slice(2, -2).split(/(?<!\\) \| /);
}

describe("escapeInline", () => {
  it("escapes every character Markdown reads inside a line", () => {
    assert.equal(escapeInline("a|b"), "a\\|b");
    assert.equal(escapeInline("*x* _y_ `z`"), "\\*x\\* \\_y\\_ \\`z\\`");
    assert.equal(escapeInline("[a](b) ![c](d)"), "\\[a\\]\\(b\\) \\!\\[c\\]\\(d\\)");
    assert.equal(escapeInline("<b>&amp;</b>"), "\\<b\\>\\&amp;\\</b\\>");
    assert.equal(escapeInline("~~s~~ $x$ \\"), "\\~\\~s\\~\\~ \\$x\\$ \\\\");
    assert.equal(escapeInline("plain words, 3.5 and 1. 2- # +"), "plain words, 3.5 and 1. 2- # +");
  });

  it("leaves no special character without its backslash", () => {
    const escaped = escapeInline(NASTY);
    assert.doesNotMatch(escaped.replace(/\\[\\`*_[\]()<>!&|~$]/g, ""), /[\\`*_[\]()<>!&|~$]/);
  });
});

describe("cell", () => {
  it("keeps a cell on one line: line breaks become <br>, tabs spaces, edges trimmed", () => {
    assert.equal(cell("one\ntwo\r\nthree\rfour"), "one<br>two<br>three<br>four");
    assert.equal(cell("\n\n  padded\t \n"), "padded");
    assert.equal(cell("a\n\nb"), "a<br><br>b");
  });

  it("shows a placeholder for a cell with no text", () => {
    assert.equal(cell(""), "*(no text)*");
    assert.equal(cell("\n \n"), "*(no text)*");
  });
});

describe("comparisonMarkdown", () => {
  const a = { role: "assistant", content: NASTY, meta: { tokens: 12, tokens_per_s: 3.5, finish_reason: "length" } };
  const b = { role: "assistant", content: "line 1\nline 2", meta: { tokens: 2, finish_reason: "eos_token" } };
  const cols = [
    { name: "sft|run", messages: [{ role: "user", content: "Q1 *bold*?" }, a, { role: "user", content: "Q2" }, b] },
    { name: "base-run", messages: [{ role: "user", content: "Q1 *bold*?" }, b] },
  ];
  const md = comparisonMarkdown({
    server: "http://h:1", cols, now: new Date("2025-01-02T03:04:05.678Z"),
    settings: { max_new_tokens: 50, temperature: 0, top_p: 1, top_k: 0, repetition_penalty: 1, system: "Be\nbrief" },
  });
  const lines = md.split("\n");

  it("heads the transcript with the server, the time and the settings", () => {
    assert.equal(lines[0], "# Comparison from tinycloud chat");
    assert.ok(lines.includes("- Server: http://h:1"));
    assert.ok(lines.includes("- Exported: 2025-01-02T03:04:05.678Z"));
    assert.ok(lines.some((l) => l.startsWith("- Settings: max new tokens 50 · greedy \\(temperature 0\\)") && l.includes("“Be brief”")));
  });

  it("has one column per model and one row per turn, every row with as many cells", () => {
    const table = lines.filter((l) => l.startsWith("| "));
    assert.equal(table[0], "| Turn | You | sft\\|run | base-run |");
    assert.equal(table[1], "| ---: | --- | --- | --- |");
    assert.equal(table.length, 4);
    for (const row of table) assert.equal(cellsOf(row).length, 4, row);
    const [turn, you, first, second] = cellsOf(table[2]);
    assert.equal(turn, "1");
    assert.equal(you, "Q1 \\*bold\\*?");
    assert.equal(first, `${escapeInline(NASTY)}<br><br>*length · 12 tokens · 3.5 tok/s*`);
    assert.equal(second, "line 1<br>line 2<br><br>*eos\\_token · 2 tokens*");
  });

  it("marks a turn a column does not have", () => {
    const row = cellsOf(lines.filter((l) => l.startsWith("| 2 |"))[0]);
    assert.equal(row[3], "—");
  });

  it("says so where a column was asked something else", () => {
    const differ = comparisonMarkdown({
      server: "s", cols: [cols[0], { name: "x", messages: [{ role: "user", content: "Other" }, b] }],
    });
    const row = cellsOf(differ.split("\n").find((l) => l.startsWith("| 1 |")));
    assert.ok(row[3].startsWith("**You:** Other<br><br>line 1"), row[3]);
  });

  it("writes a table even for an empty conversation", () => {
    const empty = comparisonMarkdown({ server: "s", cols: [{ name: "m", messages: [] }] });
    assert.ok(empty.includes("| — | — | — |"));
  });
});
