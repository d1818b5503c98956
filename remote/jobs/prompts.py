"""The prompt format: the one place it is written down.

Fine-tuning formats every instruction example with it. ``save_tokenizer_with_chat_format``
writes the matching chat template into the model's ``tokenizer_config.json`` (so TGI's
``/v1/chat/completions`` works) and the same pieces as ``prompt_format.json`` beside it (so
the chat page and the native server's ``/info`` can build multi-turn prompts without a Jinja
engine). ``remote`` renders the chat page with ``PROMPT_FORMAT`` from here. Nothing else
spells these strings out.

The format is Alpaca's (instruction, optional input, response), with the end-of-text token
closing every response so the model learns to stop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from facts import PROMPT_FORMAT_FILE

# Alpaca's own preamble ("Below is an instruction that describes a task...") is 21-33 GPT-2
# tokens on every example: a fifth of the compute of an alpaca-1k fine-tune, and of the chat
# page's context, for a sentence that never changes. These short ones carry the same cue.
PREAMBLE = "Respond to the instruction."
PREAMBLE_WITH_INPUT = "Respond to the instruction, using the input."
INSTRUCTION_HEADER = "### Instruction:\n"
INPUT_HEADER = "### Input:\n"
RESPONSE_HEADER = "### Response:\n"
SEPARATOR = "\n\n"

# The multi-turn form as data: a client builds
#   system + SEPARATOR + (user_prefix + msg + user_suffix + reply + eos + SEPARATOR)* ...
# ending with user_prefix + newest + user_suffix, and reads the reply until EOS.
PROMPT_FORMAT: dict[str, str] = {
    "system": PREAMBLE,
    "separator": SEPARATOR,
    "user_prefix": INSTRUCTION_HEADER,
    "user_suffix": SEPARATOR + RESPONSE_HEADER,
    "stop": INSTRUCTION_HEADER.strip(),  # a stop sequence for models that never saw EOS
}


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt part of one example: everything the model sees before it answers."""
    instruction, input = instruction.strip(), (input or "").strip()
    if input:
        return (
            f"{PREAMBLE_WITH_INPUT}{SEPARATOR}{INSTRUCTION_HEADER}{instruction}{SEPARATOR}"
            f"{INPUT_HEADER}{input}{SEPARATOR}{RESPONSE_HEADER}"
        )
    return f"{PREAMBLE}{SEPARATOR}{INSTRUCTION_HEADER}{instruction}{SEPARATOR}{RESPONSE_HEADER}"


def format_example(instruction: str, input: str, response: str, eos: str) -> tuple[str, str]:
    """(prompt, completion) for training; loss falls on the completion alone, EOS included."""
    return format_prompt(instruction, input), response.strip() + eos


# Renders exactly `format_prompt(user)` for [system?, user] and chains turns as PROMPT_FORMAT
# says. A system message replaces the preamble.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] | trim -}}"
    "{%- set msgs = messages[1:] -%}"
    "{%- else -%}"
    "{{- '" + PREAMBLE + "' -}}"
    "{%- set msgs = messages -%}"
    "{%- endif -%}"
    "{%- for m in msgs -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '\\n\\n### Instruction:\\n' + (m['content'] | trim) + '\\n\\n### Response:\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- (m['content'] | trim) + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def save_tokenizer_with_chat_format(tokenizer: Any, model_dir: str | Path) -> None:
    """Save ``tokenizer`` into ``model_dir`` with the chat template in tokenizer_config.json,
    and write ``prompt_format.json`` beside it.

    ``save_jinja_files=False`` because transformers 5 otherwise moves the template into
    ``chat_template.jinja``, which TGI 3.1 does not read.
    """
    tokenizer.chat_template = CHAT_TEMPLATE
    fmt = {**PROMPT_FORMAT, "eos": tokenizer.eos_token}
    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path, save_jinja_files=False)
    (path / PROMPT_FORMAT_FILE).write_text(json.dumps(fmt, indent=2) + "\n")
