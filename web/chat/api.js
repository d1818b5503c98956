// The server's HTTP API (TGI's): requests, the events of one streamed answer, and errors in the
// server's own words.
(function (exports) {
  "use strict";

  class ServerError extends Error {
    constructor(status, message, type, retryAfter) {
      super(message);
      this.status = status; // 0 for an error reported inside a stream
      this.type = type || "";
      this.retryAfter = retryAfter || "";
    }
  }

  // The error a non-2xx response carries: TGI's {"error", "error_type"}, FastAPI's {"detail"},
  // OpenAI's {"error": {"message"}}, else the start of the body as text.
  async function errorFrom(response) {
    let message = "";
    let type = "";
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "string") {
        message = body.error;
        type = body.error_type || "";
      } else if (body && typeof body.detail === "string") message = body.detail;
      else if (body && body.error && typeof body.error.message === "string") message = body.error.message;
    } catch {
      /* not JSON: show the text itself */
    }
    if (!message) message = text.trim().slice(0, 400) || response.statusText || "no error text";
    return new ServerError(response.status, message, type, response.headers.get("Retry-After"));
  }

  // What to show for an error: the server's words and what to do; `base` is the server's URL and
  // `origin` names this page's origin (browsers report a CORS refusal as a failed fetch).
  function describeError(err, base, origin) {
    if (err instanceof ServerError) {
      const kind = err.type ? " (" + err.type + ")" : "";
      const head = err.status
        ? `The server answered ${err.status}${kind}: `
        : `The server reported an error${kind}: `;
      let hint = "";
      if (err.status === 401) {
        hint = "\nThe API key in this page does not match the server's. Render the page again with the right --api-key.";
      } else if (err.status === 422) {
        hint = "\nCheck the settings (and the length of your message), then send again.";
      } else if (err.status === 429) {
        hint = "\nThe server is busy" +
          (err.retryAfter ? `; try again in ${err.retryAfter} s.` : "; try again in a moment.");
      }
      return head + err.message + hint;
    }
    if (err instanceof TypeError) {
      return `Cannot reach the server at ${base} (${err.message}).\nCheck that it is running and ` +
        `reachable from here, and that it allows this page's origin, ${origin} ` +
        "(serving: --cors-origin).";
    }
    return "Something went wrong: " + (err && err.message ? err.message : String(err));
  }

  // TGI's (and the native server's) 422 for a prompt too long says how many tokens it had; 0 when
  // the error is anything else.
  function promptTokensIn(err) {
    if (!(err instanceof ServerError) || err.status !== 422) return 0;
    const m = /Given: (\d+) `inputs` tokens/.exec(err.message) ||
      /`inputs` must have less than \d+ tokens\. Given: (\d+)/.exec(err.message);
    return m ? Number(m[1]) : 0;
  }

  // The model's context as the same 422s state it ({maxTotal} and/or {maxInput}), or null: how a
  // column learns the limits of a model that /info does not describe (a second served model).
  function limitsIn(err) {
    if (!(err instanceof ServerError) || err.status !== 422) return null;
    const total = /`inputs` tokens \+ `max_new_tokens` must be <= (\d+)/.exec(err.message);
    const input = /`inputs` must have less than (\d+) tokens/.exec(err.message);
    if (!total && !input) return null;
    return {
      ...(total ? { maxTotal: Number(total[1]) } : {}),
      ...(input ? { maxInput: Number(input[1]) } : {}),
    };
  }

  // A 422 about `top_n_tokens`: {max} the server allows (TGI: "must be >= 0 and <= 5"; 0 when it
  // takes none, "!= 0 is not allowed"), or null when the error is about something else.
  function topTokensLimitIn(err) {
    if (!(err instanceof ServerError) || err.status !== 422 || !/top_n_tokens/.test(err.message)) return null;
    const m = /`top_n_tokens` must be >= 0 and <= (\d+)/.exec(err.message);
    return { max: m ? Number(m[1]) : 0 };
  }

  // The native server's /tokenize refuses to list a text of more than 16 contexts' worth of tokens,
  // with a 422 that counts them ("`inputs` has [at least] N tokens; /tokenize lists at most M"):
  // N, a count far past any context (the text is too long, not uncountable); 0 for any other error.
  function tokensTooManyToList(err) {
    if (!(err instanceof ServerError) || err.status !== 422) return 0;
    const m = /`inputs` has (?:at least )?(\d+) tokens; \/tokenize lists at most \d+/.exec(err.message);
    return m ? Number(m[1]) : 0;
  }

  // One answer from /generate_stream, folded from its events: `take(event)` returns the text to
  // show now ("" for none; special tokens are counted, not shown) and throws a ServerError for
  // an error event. The last event's generated_text and details end up in finalText and details;
  // `onToken(data)` sees each event that carries a token (with its `top_tokens`, if any).
  function createAnswer({ onToken } = {}) {
    const answer = {
      text: "",
      tokens: 0,
      finalText: null,
      details: null,
      take(ev) {
        let data;
        try {
          data = JSON.parse(ev.data);
        } catch {
          return ""; // e.g. a keep-alive payload
        }
        if (!data || typeof data !== "object") return "";
        if (data.error) throw new ServerError(0, data.error, data.error_type);
        let shown = "";
        if (data.token) {
          answer.tokens += 1;
          if (!data.token.special && data.token.text) shown = data.token.text;
          if (onToken) onToken(data);
        }
        answer.text += shown;
        if (typeof data.generated_text === "string") answer.finalText = data.generated_text;
        if (data.details) answer.details = data.details;
        return shown;
      },
    };
    return answer;
  }

  // The requests the page makes, with the API key. A failed request throws: a ServerError for
  // an answer that is not 2xx, a TypeError when nothing answered.
  function createClient(base, apiKey) {
    const headers = (extra = {}) => {
      const all = { ...extra };
      if (apiKey) all.Authorization = "Bearer " + apiKey;
      return all;
    };
    const client = {
      base,
      canTokenize: true, // false once /tokenize proved missing: callers estimate instead
      async health() {
        const res = await fetch(base + "/health", { headers: headers() });
        if (!res.ok) throw await errorFrom(res);
      },
      async info() {
        const res = await fetch(base + "/info", { headers: headers() });
        if (!res.ok) throw await errorFrom(res);
        return res.json();
      },
      // The served models as /v1/models lists them (OpenAI's {"data": [{"id"}, ...]}), or null
      // where the server has no such route or answers something else.
      async models() {
        try {
          const res = await fetch(base + "/v1/models", { headers: headers() });
          return res.ok ? await res.json() : null;
        } catch {
          return null;
        }
      },
      // The prompt's length in the model's tokens, or null where the server cannot count
      // (TGI can; a server without /tokenize is asked once, then never again until reset).
      // A text too long to list is counted as the server's 422 counts it (see
      // tokensTooManyToList), and the server is asked again next time.
      // `parameters` picks the model ({adapter_id}) where several are served.
      async tokenize(text, signal, parameters) {
        if (!client.canTokenize) return null;
        try {
          const res = await fetch(base + "/tokenize", {
            method: "POST", signal,
            headers: headers({ "Content-Type": "application/json" }),
            body: JSON.stringify(parameters ? { inputs: text, parameters } : { inputs: text }),
          });
          if (res.ok) {
            const body = await res.json();
            if (Array.isArray(body)) return body.length;
          } else if (res.status === 422) {
            const n = tokensTooManyToList(await errorFrom(res));
            if (n) return n;
          }
        } catch (e) {
          if (e.name === "AbortError") throw e;
        }
        client.canTokenize = false;
        return null;
      },
      // The open event stream of one answer (read it with sse.readSSE).
      async generateStream(body, signal) {
        const res = await fetch(base + "/generate_stream", {
          method: "POST", signal,
          headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
          body: JSON.stringify(body),
        });
        if (!res.ok) throw await errorFrom(res);
        return res;
      },
    };
    return client;
  }

  exports.ServerError = ServerError;
  exports.errorFrom = errorFrom;
  exports.describeError = describeError;
  exports.promptTokensIn = promptTokensIn;
  exports.limitsIn = limitsIn;
  exports.topTokensLimitIn = topTokensLimitIn;
  exports.tokensTooManyToList = tokensTooManyToList;
  exports.createAnswer = createAnswer;
  exports.createClient = createClient;
})(typeof tinycloud === "object" ? (tinycloud.api = {}) : module.exports);
