"""Reading JSON files with one-line errors, whole or one array element at a time.

`load_json` parses a file into Python objects (what the converters and check-dataset use).
`stream_members` walks a top-level object member by member and hands the elements of chosen arrays
to a callback one at a time, so a COCO file's 860 000 annotations never exist as Python objects all at
once: each is turned into rows of compact arrays and dropped. Both use the standard library's JSON
scanner (the same grammar, NaN/Infinity included, and the same error messages and positions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from maskrcnn.errors import UserError

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_WHITESPACE_CHARS = " \t\n\r"


def read_json_text(path: Path, what: str = "annotation file", hint: str = "") -> str:
    """Return the text of a JSON file (UTF-8/16/32, as json.load detects it), or raise UserError naming it."""
    suffix = f"; {hint}" if hint else ""
    if not path.exists():
        raise UserError(f"{what} '{path}' does not exist")
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a directory; give the .json file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read: {e.strerror}") from None
    try:
        return raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError:
        raise UserError(f"{what} '{path}' is not UTF-8 JSON text{suffix}") from None


def json_error(path: Path, e: json.JSONDecodeError, what: str = "annotation file", hint: str = "") -> UserError:
    """Return the one-line UserError for a JSON syntax error in `path`."""
    suffix = f"; {hint}" if hint else ""
    return UserError(f"{what} '{path}' is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}){suffix}")


def load_json(path: Path, what: str = "annotation file", hint: str = "") -> Any:
    """Return the parsed JSON file, or raise UserError naming it, the problem and `hint` (what to do)."""
    text = read_json_text(path, what, hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise json_error(path, e, what, hint) from None


class DuplicateMember(ValueError):
    """A streamed array's key appears twice in the object (json.loads would keep only the last)."""


def stream_members(text: str, on_item: dict[str, Callable[[int, Any], None]]) -> Any:
    """Parse `text`; for a top-level object, call `on_item[key](index, element)` for each element of
    the arrays named in `on_item` instead of keeping them, and return the object's other members.

    A streamed member appears in the result as an empty list (it was a list, and its elements are dealt
    with). Text that is
    not an object is parsed whole and returned as is. Raises json.JSONDecodeError as json.loads does,
    and DuplicateMember if a streamed key repeats.
    """
    decoder = json.JSONDecoder()
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        return json.loads(text)  # a list, a number, empty text...: json's own value or error
    members: dict[str, Any] = {}
    pos = _skip(text, pos + 1)
    if text.startswith("}", pos):
        pos += 1
    else:
        while True:
            if not text.startswith('"', pos):
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
            key, pos = decoder.raw_decode(text, pos)
            pos = _skip(text, pos)
            if not text.startswith(":", pos):
                raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
            pos = _skip(text, pos + 1)
            if key in on_item and text.startswith("[", pos):
                if key in members:
                    raise DuplicateMember(key)
                pos = _stream_array(text, pos, decoder, on_item[key])
                members[key] = []
            else:
                members[key], pos = decoder.raw_decode(text, pos)
            pos = _skip(text, pos)
            if text.startswith(",", pos):
                pos = _skip(text, pos + 1)
            elif text.startswith("}", pos):
                pos += 1
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
    pos = _skip(text, pos)
    if pos != len(text):
        raise json.JSONDecodeError("Extra data", text, pos)
    return members


def _skip(text: str, pos: int) -> int:
    """Return the position after any JSON whitespace at `pos`."""
    return _WHITESPACE.match(text, pos).end()  # type: ignore[union-attr]  # always matches


def _stream_array(text: str, pos: int, decoder: json.JSONDecoder, on_item: Callable[[int, Any], None]) -> int:
    """Hand each element of the array starting at `pos` ('[') to `on_item`; return the position after ']'."""
    pos = _skip(text, pos + 1)
    if text.startswith("]", pos):
        return pos + 1
    index = 0
    scan = decoder.scan_once  # what raw_decode calls, without its wrapper (called once per element)
    while True:
        try:
            item, pos = scan(text, pos)
        except StopIteration as e:
            raise json.JSONDecodeError("Expecting value", text, e.value) from None
        on_item(index, item)
        index += 1
        if text[pos:pos + 1] in _WHITESPACE_CHARS:  # (also true at the end of the text: '' is in any str)
            pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos += 1
            if text[pos:pos + 1] in _WHITESPACE_CHARS:
                pos = _skip(text, pos)
        elif text.startswith("]", pos):
            return pos + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
