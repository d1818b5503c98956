"""Constrained decoding: TGI's ``grammar`` (a JSON Schema or a regex) and the chat route's
``response_format``, compiled with llguidance and applied as a mask over the next token.

TGI 3.3 checks a JSON grammar in its router (validation.rs): a string must parse as JSON, the
value must be an object (else "grammar is not supported"), a valid draft 2020-12 JSON Schema,
and have ``properties``; then outlines-core turns it into a regex. Here the same checks give the
same messages, and llguidance (the Rust engine behind Guidance, also used by vLLM, SGLang and
llama.cpp) compiles the schema or regex. llguidance computes each step's mask lazily from the
tokenizer's token trie (tens of microseconds a token), so there is no per-grammar index to build
over the whole vocabulary; a regex that does not compile is a 422 here, where TGI would fail
the request later in its model server. JSON is generated as outlines-core writes it: at most
one space between tokens.

One ``Grammar`` per request (compiled in a validation worker, never on the event loop or the
scheduler thread), one ``Constraint`` per sequence that follows it (``best_of`` runs several).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

from serving import constants as C
from serving.schema import (
    JsonFormat,
    JsonGrammar,
    JsonSchemaFormat,
    JsonSchemaGrammar,
    RegexGrammar,
    TextFormat,
)
from serving.validation import ValidationError


class GrammarError(ValidationError):
    """The grammar is refused; the message is TGI's ("grammar is not valid: ...")."""


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint: what the request asked for, and a matcher to copy per sequence."""

    kind: str  # "json" or "regex"
    matcher: Any  # an llguidance.LLMatcher at the start state; never advanced itself
    vocab: int  # the tokenizer's vocabulary size, which the matcher's masks cover

    def constraint(self, eos_ids: frozenset[int]) -> Constraint:
        return Constraint(self.matcher.deep_copy(), self.vocab, eos_ids)


class Constraint:
    """One sequence's place in its grammar: which tokens may come next, advanced per token.
    Used by the scheduler thread only."""

    def __init__(self, matcher: Any, vocab: int, eos_ids: frozenset[int]) -> None:
        import torch

        self.matcher = matcher
        self.words = (vocab + 31) // 32  # the mask is one bit per token, 32 to an int32
        self.eos_ids = eos_ids
        self.shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self, rows: int) -> Any:
        """A boolean mask over ``rows`` logits (the model's rows may outnumber the tokenizer's
        tokens: the extra rows are never allowed)."""
        import torch

        bits = torch.zeros(max(self.words, (rows + 31) // 32), dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(bits.data_ptr(), self.words * 4)
        mask = ((bits.view(-1, 1) >> self.shifts) & 1).flatten()[:rows].bool()
        if self.matcher.is_error() or not bool(mask.any()):
            raise RuntimeError(f"the grammar allows no next token: {self.matcher.get_error()}")
        return mask

    def advance(self, token: int) -> None:
        """Feed the chosen token; EOS ends the sequence, so it is never fed."""
        if token in self.eos_ids:
            return
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")


class GrammarCompiler:
    """Turns a request's grammar into a ``Grammar`` for one model's tokenizer. The llguidance
    view of the tokenizer is built on first use (about a second for GPT-2's 50k tokens)."""

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._eos = sorted(eos_ids)
        self._lltok: Any = None
        self._lock = threading.Lock()

    def compile(self, grammar: Any) -> Grammar | None:
        """A ``Grammar`` for a TGI grammar or an OpenAI response_format (None: no constraint).
        Raises ``GrammarError`` with TGI's message for what TGI refuses."""
        import llguidance

        if grammar is None or isinstance(grammar, TextFormat):
            return None
        if isinstance(grammar, RegexGrammar):
            return self._build("regex", llguidance.LLMatcher.grammar_from_regex(grammar.value))
        if isinstance(grammar, JsonFormat) and grammar.value is None:
            schema: Any = {"type": "object"}  # OpenAI's JSON mode: any object
        elif isinstance(grammar, JsonGrammar | JsonFormat):
            schema = json_schema(grammar.value)
        elif isinstance(grammar, JsonSchemaGrammar | JsonSchemaFormat):
            config = grammar.value or getattr(grammar, "json_schema", None)
            if config is None:
                raise GrammarError("grammar is not valid: `json_schema` needs a `value`")
            schema = checked_schema(config.schema_)
        else:  # pragma: no cover - the schema's union is closed
            raise GrammarError("grammar is not supported")
        options = {"whitespace_pattern": C.JSON_WHITESPACE}
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, options)
        return self._build("json", text)

    def _build(self, kind: str, text: str) -> Grammar:
        import llguidance

        lltok = self._llguidance_tokenizer()
        matcher = llguidance.LLMatcher(lltok, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"grammar is not valid: {matcher.get_error().strip()}")
        return Grammar(kind, matcher, lltok.vocab_size)

    def _llguidance_tokenizer(self) -> Any:
        with self._lock:
            if self._lltok is None:
                import llguidance.hf

                self._lltok = llguidance.hf.from_tokenizer(self._tokenizer, eos_token=self._eos)
            return self._lltok


def json_schema(value: Any) -> Any:
    """TGI's checks on ``{"type": "json", "value": ...}``: a string is parsed as JSON; then the
    value must be an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise GrammarError(f"grammar is not valid: {e}") from None
    elif not isinstance(value, dict):
        raise GrammarError("grammar is not supported")
    return checked_schema(value)


def checked_schema(schema: Any) -> Any:
    """A valid draft 2020-12 JSON Schema with ``properties``, or TGI's refusal."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise GrammarError(f"grammar is not valid: {e.message}") from None
    except RecursionError:
        raise GrammarError("grammar is not valid: the schema is nested too deeply") from None
    if not isinstance(schema, dict) or "properties" not in schema:
        raise GrammarError("grammar is not valid: Grammar must have a 'properties' field")
    return as_outlines_reads_it(schema)


def as_outlines_reads_it(schema: Any) -> Any:
    """outlines-core (TGI's compiler, json_schema/parsing.rs) reads any schema with
    ``properties`` as an object of exactly those properties, in their order: whatever its
    ``type`` and ``additionalProperties`` say. (In JSON Schema proper it would also admit
    ``null``, or extra keys, which a small model then fills forever.) Say so for llguidance."""
    if isinstance(schema, list):
        return [as_outlines_reads_it(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: as_outlines_reads_it(v) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict):
        out.update(type="object", additionalProperties=False)
    return out
