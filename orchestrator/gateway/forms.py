"""Starlette's form parsers, keeping a text field's bytes that are not valid in its charset.

Starlette reads such a multipart field as latin-1 and such a URL-encoded one with U+FFFD, so a
prompt of invalid UTF-8 would be queued changed. Here the bytes that do not decode become lone
surrogates (Python's `surrogateescape`, as it reads undecodable command-line bytes), which the
request checks refuse naming the field, exactly as `ltx2 submit` refuses such a `--prompt`.
Everything else (limits, files, errors) is Starlette's.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.formparsers import FormParser, MultiPartParser


class StrictMultiPartParser(MultiPartParser):
    """multipart/form-data whose undecodable text bytes become lone surrogates."""

    def on_part_end(self) -> None:
        part = self._current_part
        super().on_part_end()
        if part.file is None:
            name, _ = self.items[-1]
            self.items[-1] = (name, bytes(part.data).decode(self._charset or "utf-8", "surrogateescape"))


class StrictFormParser(FormParser):
    """application/x-www-form-urlencoded whose undecodable bytes become lone surrogates."""

    def on_field_end(self) -> None:
        super().on_field_end()
        name, _ = self._items[-1]
        raw = unquote_to_bytes(bytes(self._field_value).replace(b"+", b" "))
        self._items[-1] = (name, raw.decode("utf-8", "surrogateescape"))
