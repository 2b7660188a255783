"""The error a create request's field is refused with before the daemon sees it (app.py answers it as 400,
OpenAI's JSON naming the field), and how its message shows the client's value; its own module so every
parser of the request's fields raises the one class."""

from __future__ import annotations

import math


class RequestError(ValueError):
    """A field the gateway refuses before the daemon sees it; `param` names it as the client sent it."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def shown(value: object) -> str:
    """A client's value for an error message, cut short (a number may have thousands of digits)."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"a {math.floor(math.log10(abs(value))) + 1}-digit number"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
