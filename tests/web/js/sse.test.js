// web/chat/sse.js and the stream half of web/chat/api.js: /generate_stream's bytes to an answer.
"use strict";

const assert = require("node:assert/strict");
const { describe, it } = require("node:test");

const { createSSEParser, readSSE } = require("../../../web/chat/sse.js");
const { createAnswer, ServerError } = require("../../../web/chat/api.js");

function parse(chunks) {
  const events = [];
  const parser = createSSEParser((e) => events.push(e));
  for (const c of chunks) parser.push(c);
  parser.end();
  return events;
}

// Every way to cut `text` into three pieces (and into single characters).
function* splits(text) {
  for (let i = 0; i <= text.length; i += 1) {
    for (let j = i; j <= text.length; j += 1) yield [text.slice(0, i), text.slice(i, j), text.slice(j)];
  }
  yield [...text];
}

// A stream as TGI and the native server send it, with the wire's variations mixed in.
const STREAM =
  ': keep-alive\r\n\r\n' +
  'data:{"token":{"id":1,"text":"a","special":false}}\r\n\r\n' +
  'data: {"token":{"id":2,"text":"b\\r\\n","special":false}}\n\n' +
  "event: x\ndata: 1\ndata: 2\r\r" +
  "data\n\n" +
  "id: 7\nretry: 10\ndata:  two spaces\n\n" +
  'data: {"token":{"id":50256,"text":"<|endoftext|>","special":true},"generated_text":"ab","details":{"finish_reason":"eos_token","generated_tokens":3,"input_length":5}}\n\n';

const EVENTS = [
  { event: "message", data: '{"token":{"id":1,"text":"a","special":false}}' },
  { event: "message", data: '{"token":{"id":2,"text":"b\\r\\n","special":false}}' },
  { event: "x", data: "1\n2" },
  { event: "message", data: "" },
  { event: "message", data: " two spaces" },
  {
    event: "message",
    data: '{"token":{"id":50256,"text":"<|endoftext|>","special":true},"generated_text":"ab","details":{"finish_reason":"eos_token","generated_tokens":3,"input_length":5}}',
  },
];

describe("createSSEParser", () => {
  it("reads each kind of line: data, event, comments, other fields, \\n, \\r\\n and \\r", () => {
    assert.deepEqual(parse([STREAM]), EVENTS);
  });

  it("gives the same events however the stream is cut into chunks", () => {
    for (const chunks of splits(STREAM)) assert.deepEqual(parse(chunks), EVENTS, JSON.stringify(chunks));
  });

  it("waits for the next chunk when one ends in \\r (half of a \\r\\n)", () => {
    const events = [];
    const parser = createSSEParser((e) => events.push(e));
    parser.push("data: a\r");
    assert.deepEqual(events, []);
    parser.push("\n\r");
    assert.deepEqual(events, []); // "\r\n" ended the line, the lone "\r" may still be "\r\n"
    parser.push("\n");
    assert.deepEqual(events, [{ event: "message", data: "a" }]);
  });

  it("joins multi-line data with \\n and keeps the rest of a line after the first colon", () => {
    assert.deepEqual(parse(["data: {\"a\":\ndata:  1}\ndata: x:y\n\n"]), [
      { event: "message", data: '{"a":\n 1}\nx:y' },
    ]);
  });

  it("sends no event for comments or a blank line alone, and resets the event name", () => {
    assert.deepEqual(parse([":ping\n\n\n\n: more\n\nevent: e\n\ndata: d\n\n"]), [{ event: "message", data: "d" }]);
  });

  it("flushes a last event that lacks its blank line, with or without a final line end", () => {
    assert.deepEqual(parse(["data: x\n"]), [{ event: "message", data: "x" }]);
    assert.deepEqual(parse(["data: x\r"]), [{ event: "message", data: "x" }]);
    assert.deepEqual(parse(["data: x"]), [{ event: "message", data: "x" }]);
    assert.deepEqual(parse([""]), []);
  });
});

// A real fetch Response whose body arrives in the given byte chunks.
function responseOf(chunks) {
  const body = new ReadableStream({
    start(controller) {
      for (const c of chunks) controller.enqueue(c);
      controller.close();
    },
  });
  return new Response(body, { headers: { "Content-Type": "text/event-stream" } });
}

describe("readSSE", () => {
  it("decodes UTF-8 characters split across network chunks", async () => {
    const bytes = new TextEncoder().encode('data: {"token":{"text":"é🙂☃"}}\r\n\r\ndata: end');
    for (let cut = 1; cut < bytes.length; cut += 1) {
      const events = [];
      await readSSE(responseOf([bytes.slice(0, cut), bytes.slice(cut)]), (e) => events.push(e));
      assert.deepEqual(events, [
        { event: "message", data: '{"token":{"text":"é🙂☃"}}' },
        { event: "message", data: "end" },
      ]);
    }
  });

  it("reads a body that arrives one byte at a time", async () => {
    const bytes = new TextEncoder().encode(STREAM);
    const events = [];
    await readSSE(responseOf([...bytes].map((b) => new Uint8Array([b]))), (e) => events.push(e));
    assert.deepEqual(events, EVENTS);
  });
});

describe("createAnswer", () => {
  it("shows tokens as they come, counts special ones, and keeps the final text and details", () => {
    const answer = createAnswer();
    const shown = parse([STREAM]).map((e) => answer.take(e));
    assert.deepEqual(shown, ["a", "b\r\n", "", "", "", ""]);
    assert.equal(answer.text, "ab\r\n");
    assert.equal(answer.tokens, 3);
    assert.equal(answer.finalText, "ab");
    assert.deepEqual(answer.details, { finish_reason: "eos_token", generated_tokens: 3, input_length: 5 });
  });

  it("has no final text or details when the stream ends early", () => {
    const answer = createAnswer();
    answer.take({ event: "message", data: '{"token":{"text":"half"}}' });
    assert.equal(answer.finalText, null);
    assert.equal(answer.details, null);
    assert.equal(answer.text, "half");
  });

  it("ignores payloads that are not JSON objects", () => {
    const answer = createAnswer();
    for (const data of ["", "keep-alive", "null", "42", '"text"']) assert.equal(answer.take({ data }), "");
    assert.equal(answer.tokens, 0);
  });

  it("turns an error event into a ServerError with the server's words and type", () => {
    const answer = createAnswer();
    answer.take({ data: '{"token":{"text":"partial"}}' });
    const events = parse(['data: {"error":"Request failed during generation: out of memory","error_type":"generation"}\n\n']);
    assert.throws(
      () => answer.take(events[0]),
      (err) => err instanceof ServerError && err.status === 0 && err.type === "generation" &&
        err.message === "Request failed during generation: out of memory",
    );
    assert.equal(answer.text, "partial"); // what came before the error is kept
    assert.throws(() => answer.take({ data: '{"error":"stopped"}' }), { name: "Error", message: "stopped", type: "" });
  });
});
