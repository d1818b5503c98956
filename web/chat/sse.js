// Server-sent events: the wire format of /generate_stream.
//
// Every file in web/chat/ but app.js is written the same way: one function scope that hands its
// exports to the page's `tinycloud` namespace (web/render.py inlines the files into one script
// that declares it) or, under Node, to `module.exports`, so tests/web/js/ can test it as it is.
(function (exports) {
  "use strict";

  // A line may be split across network chunks, a chunk may hold many events, and lines may end
  // in \n, \r\n or \r (a \r at a chunk's end may be half of a \r\n, so it waits for the next
  // chunk). Calls onEvent({event, data}) for each event that has data; `end()` flushes the last.
  function createSSEParser(onEvent) {
    let buffer = "";
    let data = [];
    let eventName = "";
    function dispatch() {
      if (data.length) onEvent({ event: eventName || "message", data: data.join("\n") });
      data = [];
      eventName = "";
    }
    function line(text) {
      if (text === "") return dispatch();
      if (text.startsWith(":")) return; // comment / keep-alive
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "event") eventName = value;
    }
    return {
      push(chunk) {
        buffer += chunk;
        const eol = /\r\n|\r|\n/g;
        let start = 0;
        let m;
        while ((m = eol.exec(buffer)) !== null) {
          if (m[0] === "\r" && m.index === buffer.length - 1) break;
          line(buffer.slice(start, m.index));
          start = m.index + m[0].length;
        }
        buffer = buffer.slice(start);
      },
      end() {
        if (buffer.length) line(buffer.replace(/\r$/, ""));
        buffer = "";
        dispatch(); // a last event without its blank line
      },
    };
  }

  // Reads a fetch() Response's body to its end as UTF-8 (a character split across two network
  // chunks is decoded whole) and passes each event to onEvent.
  async function readSSE(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder("utf-8");
    const parser = createSSEParser(onEvent);
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(decoder.decode(value, { stream: true }));
    }
    parser.push(decoder.decode());
    parser.end();
  }

  exports.createSSEParser = createSSEParser;
  exports.readSSE = readSSE;
})(typeof tinycloud === "object" ? (tinycloud.sse = {}) : module.exports);
