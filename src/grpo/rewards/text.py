"""The text of a completion, whatever shape a reward function was given it in."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """The text of one completion: itself if a string, else its last assistant message.

    >>> completion_text("4")
    '4'
    >>> completion_text([{"role": "assistant", "content": "4"}])
    '4'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"]
        if assistant or messages:
            return _content_text((assistant or messages)[-1].get("content"))
        return ""
    return "" if completion is None else str(completion)


def _content_text(content: Any) -> str:
    # Newer chat formats allow content as a list of parts: [{"type": "text", "text": ...}].
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)
