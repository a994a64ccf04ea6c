"""`Pass` and `Window`: what a staged experiment yields and what its bodies are told.

They live apart from `runtime.py` so that a module defining experiments can import them
(`from ndif_jobs import Pass, Window`) without importing torch: every `ndif-jobs` command that
names the module with `--import` imports it. Like the runtime, this module travels to NDIF.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Body = Callable[[Any, "Window"], dict]


class Pass:
    """One forward pass of one prompt: runs as an invoke; `body` runs inside it.

    `body(model, window)` is called inside the prompt's invoke and returns a dict of what to
    keep (tensors are saved for it); the staged experiment receives those dicts, one per pass.
    """

    __slots__ = ("prompt", "body")

    def __init__(self, prompt: str, body: Body) -> None:
        self.prompt = prompt
        self.body = body


class Window:
    """Where one prompt's tokens sit in a left-padded batch row.

    `offset` pad columns come first, then `length` real tokens. Position -1 is always the
    prompt's last token; a position p >= 0 counts from its first real token.
    """

    __slots__ = ("offset", "length")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length

    def index(self, position: int) -> int:
        """The column of `position` in the padded row (a negative one counts from the end)."""
        if not -self.length <= position < self.length:
            raise IndexError(f"position {position} is outside a prompt of {self.length} tokens")
        return self.offset + position if position >= 0 else position

    def tokens(self, hidden: Any) -> Any:
        """`hidden[:, real tokens]`: a [batch, seq, ...] tensor without its padding."""
        return hidden[:, self.offset :]
