"""The error a create request's field is refused with before the daemon sees it (app.py answers it as 400,
OpenAI's JSON naming the field); its own module so every parser of the request's fields raises the one class."""

from __future__ import annotations


class RequestError(ValueError):
    """A field the gateway refuses before the daemon sees it; `param` names it as the client sent it."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code
