// web/chat/api.js: errors in the server's own words, and the client against a real HTTP server on
// the loopback (Node's own http module, answering as TGI does).
"use strict";

const assert = require("node:assert/strict");
const http = require("node:http");
const { describe, it, before, after } = require("node:test");

const { ServerError, errorFrom, describeError, promptTokensIn, limitsIn, topTokensLimitIn, createAnswer, createClient } =
  require("../../../web/chat/api.js");
const { readSSE } = require("../../../web/chat/sse.js");

const BASE = "http://127.0.0.1:9";
const ORIGIN = "null (a page opened from disk)";

describe("errorFrom", () => {
  const from = (body, init = {}) => errorFrom(new Response(body, { status: 422, ...init }));

  it("reads TGI's, FastAPI's and OpenAI's error bodies", async () => {
    const tgi = await from('{"error": "`top_p` must be > 0.0 and < 1.0", "error_type": "validation"}');
    assert.ok(tgi instanceof ServerError);
    assert.deepEqual([tgi.status, tgi.message, tgi.type], [422, "`top_p` must be > 0.0 and < 1.0", "validation"]);
    assert.equal((await from('{"detail": "Not Found"}', { status: 404 })).message, "Not Found");
    assert.equal((await from('{"error": {"message": "bad model"}}')).message, "bad model");
  });

  it("falls back to the body's text (its start), then the status text", async () => {
    assert.equal((await from("  upstream timed out \n", { status: 504 })).message, "upstream timed out");
    assert.equal((await from("x".repeat(1000))).message, "x".repeat(400));
    assert.equal((await from('{"unknown": 1}')).message, '{"unknown": 1}');
    assert.equal((await from("", { status: 503, statusText: "Service Unavailable" })).message, "Service Unavailable");
    assert.equal((await from(null, { status: 500 })).message, "no error text");
  });

  it("keeps Retry-After", async () => {
    const err = await from('{"error": "Model is overloaded", "error_type": "overloaded"}', {
      status: 429, headers: { "Retry-After": "3" },
    });
    assert.equal(err.retryAfter, "3");
  });
});

describe("describeError", () => {
  it("gives the server's words with what to do", () => {
    const say = (...args) => describeError(new ServerError(...args), BASE, ORIGIN);
    assert.equal(
      say(401, "Unauthorized: send the API key", "authentication"),
      "The server answered 401 (authentication): Unauthorized: send the API key\n" +
        "The API key in this page does not match the server's. Render the page again with the right --api-key.",
    );
    assert.match(say(422, "too long", "validation"), /^The server answered 422 \(validation\): too long\nCheck the settings/);
    assert.match(say(429, "busy", "overloaded", "2"), /\nThe server is busy; try again in 2 s\.$/);
    assert.match(say(429, "busy"), /^The server answered 429: busy\nThe server is busy; try again in a moment\.$/);
    assert.equal(say(0, "out of memory", "generation"), "The server reported an error (generation): out of memory");
  });

  it("names the server and the page's origin when nothing answered", () => {
    assert.equal(
      describeError(new TypeError("Failed to fetch"), BASE, ORIGIN),
      `Cannot reach the server at ${BASE} (Failed to fetch).\nCheck that it is running and reachable ` +
        `from here, and that it allows this page's origin, ${ORIGIN} (serving: --cors-origin).`,
    );
    assert.equal(describeError(new Error("boom"), BASE, ORIGIN), "Something went wrong: boom");
    assert.equal(describeError("odd", BASE, ORIGIN), "Something went wrong: odd");
  });
});

describe("promptTokensIn", () => {
  it("reads the prompt's length from a 422 for a prompt too long, in either wording", () => {
    const tgi = "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 1024. Given: 1000 `inputs` tokens and 200 `max_new_tokens`";
    assert.equal(promptTokensIn(new ServerError(422, tgi, "validation")), 1000);
    assert.equal(promptTokensIn(new ServerError(422, "`inputs` must have less than 512 tokens. Given: 700")), 700);
  });

  it("is 0 for any other error", () => {
    assert.equal(promptTokensIn(new ServerError(422, "`top_p` must be > 0.0")), 0);
    assert.equal(promptTokensIn(new ServerError(400, "Given: 1000 `inputs` tokens")), 0);
    assert.equal(promptTokensIn(new Error("Given: 1000 `inputs` tokens")), 0);
  });
});

describe("limitsIn", () => {
  it("reads the model's context from the 422s that state it", () => {
    const total = "`inputs` tokens + `max_new_tokens` must be <= 128. Given: 100 `inputs` tokens and 64 `max_new_tokens`";
    assert.deepEqual(limitsIn(new ServerError(422, total, "validation")), { maxTotal: 128 });
    assert.deepEqual(limitsIn(new ServerError(422, "`inputs` must have less than 127 tokens. Given: 300")), { maxInput: 127 });
  });

  it("is null for any other error", () => {
    assert.equal(limitsIn(new ServerError(422, "`top_p` must be > 0.0 and < 1.0")), null);
    assert.equal(limitsIn(new ServerError(500, "`inputs` must have less than 127 tokens. Given: 300")), null);
    assert.equal(limitsIn(new TypeError("Failed to fetch")), null);
  });
});

describe("topTokensLimitIn", () => {
  it("reads how many alternatives a server takes from its 422, in TGI's words", () => {
    assert.deepEqual(topTokensLimitIn(new ServerError(422, "`top_n_tokens` must be >= 0 and <= 3. Given: 5")), { max: 3 });
    assert.deepEqual(topTokensLimitIn(new ServerError(422, "`top_n_tokens` != 0 is not allowed for this endpoint")), { max: 0 });
  });

  it("is null for an error about anything else", () => {
    assert.equal(topTokensLimitIn(new ServerError(422, "`top_k` must be strictly positive")), null);
    assert.equal(topTokensLimitIn(new ServerError(400, "`top_n_tokens` != 0 is not allowed")), null);
  });
});

describe("createAnswer", () => {
  it("hands each token event, with its top_tokens, to onToken; text and details as before", () => {
    const seen = [];
    const answer = createAnswer({ onToken: (data) => seen.push(data) });
    const events = [
      { token: { id: 5, text: " Hi", logprob: -0.2, special: false },
        top_tokens: [{ id: 5, text: " Hi", logprob: -0.2, special: false }, { id: 6, text: " Yo", logprob: -2, special: false }] },
      { token: { id: 0, text: "<|endoftext|>", logprob: -0.1, special: true }, generated_text: " Hi",
        details: { finish_reason: "eos_token", generated_tokens: 2, seed: null, input_length: 3 } },
    ];
    const shown = events.map((e) => answer.take({ data: JSON.stringify(e) }));
    assert.deepEqual(shown, [" Hi", ""]);
    assert.equal(seen.length, 2);
    assert.deepEqual(seen[0].top_tokens.map((t) => t.text), [" Hi", " Yo"]);
    assert.equal(answer.tokens, 2);
    assert.equal(answer.finalText, " Hi");
    assert.equal(answer.details.finish_reason, "eos_token");
    assert.equal(answer.take({ data: "keep-alive" }), "");
    assert.equal(seen.length, 2); // an event without a token is not one
  });
});

describe("createClient against a real server", () => {
  let server;
  let base;
  const requests = [];
  const routes = {}; // "METHOD /path" -> (body) => [status, headers, text]

  before(async () => {
    server = http.createServer((req, res) => {
      let body = "";
      req.on("data", (c) => { body += c; });
      req.on("end", () => {
        requests.push({ method: req.method, url: req.url, auth: req.headers.authorization, body });
        const route = routes[`${req.method} ${req.url}`];
        const [status, headers, text] = route ? route(body) : [404, {}, '{"error": "Not Found"}'];
        res.writeHead(status, headers);
        res.end(text);
      });
    });
    await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
    base = `http://127.0.0.1:${server.address().port}`;
  });

  after(() => new Promise((resolve) => server.close(resolve)));

  const json = (status, value, headers = {}) => [status, { "Content-Type": "application/json", ...headers }, JSON.stringify(value)];

  it("sends the API key as a bearer token, and none without a key", async () => {
    routes["GET /health"] = () => [200, {}, ""];
    requests.length = 0;
    await createClient(base, 'k"</script>').health();
    await createClient(base, null).health();
    assert.deepEqual(requests.map((r) => r.auth), ['Bearer k"</script>', undefined]);
  });

  it("throws the server's error for a health check or /info that is not 2xx", async () => {
    routes["GET /health"] = () => json(503, { error: "loading", error_type: "unhealthy" });
    routes["GET /info"] = () => json(401, { error: "Unauthorized", error_type: "authentication" });
    const client = createClient(base, "k");
    await assert.rejects(client.health(), (e) => e instanceof ServerError && e.status === 503 && e.message === "loading");
    await assert.rejects(client.info(), (e) => e instanceof ServerError && e.status === 401 && e.type === "authentication");
    routes["GET /info"] = () => json(200, { model_id: "tiny", max_total_tokens: 64 });
    assert.deepEqual(await client.info(), { model_id: "tiny", max_total_tokens: 64 });
  });

  it("rejects with a TypeError when nothing answers", async () => {
    const closed = http.createServer();
    await new Promise((resolve) => closed.listen(0, "127.0.0.1", resolve));
    const port = closed.address().port;
    await new Promise((resolve) => closed.close(resolve));
    await assert.rejects(createClient(`http://127.0.0.1:${port}`, null).health(), TypeError);
  });

  it("counts tokens with /tokenize where the server has it", async () => {
    routes["POST /tokenize"] = (body) => json(200, [...JSON.parse(body).inputs].map((c, id) => ({ id, text: c })));
    requests.length = 0;
    const client = createClient(base, "k");
    assert.equal(await client.tokenize("hello"), 5);
    assert.deepEqual(JSON.parse(requests[0].body), { inputs: "hello" });
    assert.equal(client.canTokenize, true);
  });

  it("counts with the model a request names, where several are served", async () => {
    routes["POST /tokenize"] = (body) => json(200, [...JSON.parse(body).inputs].map((c, id) => ({ id, text: c })));
    requests.length = 0;
    assert.equal(await createClient(base, "k").tokenize("hey", undefined, { adapter_id: "sft-run" }), 3);
    assert.deepEqual(JSON.parse(requests[0].body), { inputs: "hey", parameters: { adapter_id: "sft-run" } });
  });

  it("counts a text too long for /tokenize to list as the server's 422 counts it, and asks again", async () => {
    const tooLong = (n) => json(422, {
      error: `Input validation error: \`inputs\` has ${n} tokens; /tokenize lists at most 2048. ` +
        "Count a shorter text (the model reads far fewer)",
      error_type: "validation",
    });
    routes["POST /tokenize"] = () => tooLong("at least 5000");
    requests.length = 0;
    const client = createClient(base, "k");
    assert.equal(await client.tokenize("x".repeat(20000)), 5000);
    routes["POST /tokenize"] = () => tooLong("2100");
    assert.equal(await client.tokenize("y".repeat(9000)), 2100);
    assert.equal(client.canTokenize, true); // too long, not uncountable: /tokenize stays in use
    routes["POST /tokenize"] = (body) => json(200, [...JSON.parse(body).inputs].map((c, id) => ({ id, text: c })));
    assert.equal(await client.tokenize("hey"), 3);
    assert.equal(requests.length, 3);
    // Any other 422 (an unknown model, say) still means this server cannot count for us.
    routes["POST /tokenize"] = () => json(422, { error: "Input validation error: `adapter_id` 'x' is not served here", error_type: "validation" });
    assert.equal(await client.tokenize("hey", undefined, { adapter_id: "x" }), null);
    assert.equal(client.canTokenize, false);
  });

  it("reads the served models from /v1/models, or null without that route", async () => {
    const listed = { object: "list", data: [{ id: "base-run", object: "model", created: 0, owned_by: "tinycloud" }] };
    routes["GET /v1/models"] = () => json(200, listed);
    requests.length = 0;
    assert.deepEqual(await createClient(base, "k").models(), listed);
    assert.equal(requests[0].auth, "Bearer k");
    delete routes["GET /v1/models"];
    assert.equal(await createClient(base, "k").models(), null);
  });

  it("stops asking a server without /tokenize, until told to try again", async () => {
    delete routes["POST /tokenize"];
    requests.length = 0;
    const client = createClient(base, "k");
    assert.equal(await client.tokenize("hello"), null);
    assert.equal(await client.tokenize("hello"), null);
    assert.equal(requests.length, 1);
    routes["POST /tokenize"] = () => json(200, { not: "a list" });
    client.canTokenize = true;
    assert.equal(await client.tokenize("hello"), null);
    assert.equal(client.canTokenize, false);
  });

  it("passes an abort through instead of giving up on /tokenize", async () => {
    routes["POST /tokenize"] = () => json(200, []);
    const client = createClient(base, "k");
    const controller = new AbortController();
    controller.abort();
    await assert.rejects(client.tokenize("hello", controller.signal), { name: "AbortError" });
    assert.equal(client.canTokenize, true);
  });

  it("streams an answer, and throws a 422 with its counts", async () => {
    const stream = 'data: {"token":{"text":"Hi"}}\n\n' +
      'data: {"token":{"text":"!"},"generated_text":"Hi!","details":{"finish_reason":"length","generated_tokens":2}}\n\n';
    routes["POST /generate_stream"] = () => [200, { "Content-Type": "text/event-stream" }, stream];
    const client = createClient(base, "k");
    const res = await client.generateStream({ inputs: "x", parameters: { max_new_tokens: 2 } });
    const answer = createAnswer();
    await readSSE(res, (e) => answer.take(e));
    assert.equal(answer.text, "Hi!");
    assert.equal(answer.details.finish_reason, "length");

    const message = "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 64. Given: 70 `inputs` tokens and 2 `max_new_tokens`";
    routes["POST /generate_stream"] = () => json(422, { error: message, error_type: "validation" });
    await assert.rejects(
      client.generateStream({ inputs: "x" }),
      (e) => e instanceof ServerError && e.status === 422 && promptTokensIn(e) === 70,
    );
  });
});
