// Compare mode's state: which models the server serves, which of them the page talks to (one
// column each), each column's conversation, and what each model's context allows. One column on
// the server's own model is the plain chat page.
//
// A model is known by a key: "" for the server's own model (the one /info describes, asked for
// without `adapter_id`, so a server with one model works exactly as before), else the id
// /v1/models lists, sent as TGI's `parameters.adapter_id`.
(function (exports) {
  "use strict";

  const DEFAULT_KEY = "";
  const MAX_COLUMNS = 4; // side by side on a laptop screen; more would be too narrow to read
  const MAX_ID_LENGTH = 200;

  const positive = (x) => (Number.isInteger(x) && x > 0 ? x : undefined);
  const isObject = (x) => Boolean(x) && typeof x === "object" && !Array.isArray(x);

  // What a model entry (/info, or one /v1/models entry) says about the model's context and
  // prompt format. An entry that carries `prompt_format` (even null) speaks for its own model;
  // one without it leaves the format to /info's.
  function describe(entry) {
    const out = {
      maxTotal: positive(entry.max_total_tokens),
      maxInput: positive(entry.max_input_tokens),
    };
    if ("prompt_format" in entry) out.promptFormat = isObject(entry.prompt_format) ? entry.prompt_format : null;
    return out;
  }

  // The models the server serves, its own first: from /info (`info`) and /v1/models (`listed`,
  // OpenAI's {"data": [{"id"}, ...]}; TGI lists its one model there). Without /info's model_id
  // nothing else can be told apart from it, so only the server's own model is offered.
  function servedModels(listed, info) {
    const ownId = isObject(info) && typeof info.model_id === "string" ? info.model_id : null;
    const own = { key: DEFAULT_KEY, id: ownId, name: ownId || "the server's model", ...(isObject(info) ? describe(info) : {}) };
    const models = [own];
    if (ownId === null || !isObject(listed) || !Array.isArray(listed.data)) return models;
    const seen = new Set([ownId]);
    for (const entry of listed.data) {
      if (!isObject(entry) || typeof entry.id !== "string") continue;
      const id = entry.id;
      if (!id.trim() || id.length > MAX_ID_LENGTH || seen.has(id)) continue;
      seen.add(id);
      models.push({ key: id, id, name: id, ...describe(entry) });
    }
    return models;
  }

  // TGI's way to pick a served model per request: nothing for the server's own model.
  function adapterId(key) {
    return key === DEFAULT_KEY ? null : key;
  }

  // The context one column's prompts must fit, in fitPrompt's terms (/info's field names):
  // what the server's 422s taught (`learned`), else the model's own entry, else /info's.
  function contextOf(model, info, learned = {}) {
    const fromInfo = isObject(info) ? describe(info) : {};
    const total = learned.maxTotal ?? (model && model.maxTotal) ?? fromInfo.maxTotal;
    let input = learned.maxInput ?? (model && model.maxInput) ?? fromInfo.maxInput;
    if (total && input && input >= total) input = total - 1;
    const out = {};
    if (total) out.max_total_tokens = total;
    if (input) out.max_input_tokens = input;
    return out;
  }

  // The prompt format a column's model was fine-tuned with, as chooseFormat takes it: the
  // model's entry when it speaks for itself, else /info's.
  function formatOf(model, info) {
    if (model && "promptFormat" in model) return model.promptFormat;
    return isObject(info) ? info.prompt_format : undefined;
  }

  // Stored comparison state: {selected: [key, ...], conversations: {key: messages}}. `restore`
  // cleans one stored conversation (transcript.restoreConversation); anything unusable is
  // dropped. `legacy`: the conversation an older page kept, for the server's own model.
  function restoreComparison(stored, restore, legacy = []) {
    const conversations = Object.create(null); // keys come from storage: no prototype to reach
    let selected = [];
    if (isObject(stored)) {
      if (isObject(stored.conversations)) {
        for (const [key, messages] of Object.entries(stored.conversations)) {
          if (key.length <= MAX_ID_LENGTH) conversations[key] = restore(messages);
        }
      }
      if (Array.isArray(stored.selected)) {
        selected = [...new Set(stored.selected.filter((k) => typeof k === "string" && k.length <= MAX_ID_LENGTH))];
      }
    } else {
      conversations[DEFAULT_KEY] = restore(legacy);
    }
    selected = selected.slice(0, MAX_COLUMNS);
    if (!selected.length) selected = [DEFAULT_KEY];
    for (const key of selected) conversations[key] ??= [];
    return { selected, conversations };
  }

  // What to store: the selection and every conversation that has messages.
  function storedComparison(selected, conversations) {
    const kept = Object.create(null);
    for (const [key, messages] of Object.entries(conversations)) {
      if (messages.length) kept[key] = messages;
    }
    return { selected: selected.slice(), conversations: kept };
  }

  // A new selection after ticking (`on`) or unticking a model's box: the order models were
  // ticked in is the order of the columns; the last column cannot be unticked, and no more than
  // MAX_COLUMNS are kept.
  function toggleSelected(selected, key, on) {
    if (on) {
      if (selected.includes(key) || selected.length >= MAX_COLUMNS) return selected.slice();
      return [...selected, key];
    }
    const next = selected.filter((k) => k !== key);
    return next.length ? next : selected.slice();
  }

  // The key a loaded column's model gets here: the server's own model when it is the one the
  // column names (or the column was the server's own and names none); else its id.
  function keyFor(model, own, ownId) {
    if (model === null || model === undefined) return DEFAULT_KEY;
    if (model === ownId || (own && ownId === null)) return DEFAULT_KEY;
    return model;
  }

  // The (user, answer) turns of a column's conversation, with the answer's message (or null
  // when the question has no answer yet): for lining columns up turn by turn.
  function turnsOf(messages) {
    const turns = [];
    for (const m of messages) {
      if (m.role === "user") turns.push({ user: m.content, answer: null });
      else if (m.role === "assistant" && turns.length && !turns[turns.length - 1].answer) {
        turns[turns.length - 1].answer = m;
      }
    }
    return turns;
  }

  exports.DEFAULT_KEY = DEFAULT_KEY;
  exports.MAX_COLUMNS = MAX_COLUMNS;
  exports.MAX_ID_LENGTH = MAX_ID_LENGTH;
  exports.servedModels = servedModels;
  exports.adapterId = adapterId;
  exports.contextOf = contextOf;
  exports.formatOf = formatOf;
  exports.restoreComparison = restoreComparison;
  exports.storedComparison = storedComparison;
  exports.toggleSelected = toggleSelected;
  exports.keyFor = keyFor;
  exports.turnsOf = turnsOf;
})(typeof tinycloud === "object" ? (tinycloud.columns = {}) : module.exports);
