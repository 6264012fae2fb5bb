"""Reading an upload: the request body within a size limit and a read timeout, and the image file out of a
multipart form (parsed with python-multipart in a worker thread, not on the event loop)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import HTTPException, Request

MAX_PARTS = 8


async def read_body(request: Request, limit: int, until: float | None = None) -> bytes:
    """Return the request body, refusing (413) once it grows past `limit` bytes, and (408) when it is not
    complete by `until` (time.monotonic(); None: no time limit)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload of {int(declared)} bytes is over the limit of {limit} bytes")
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise HTTPException(413, f"upload is over the limit of {limit} bytes")

    try:
        await asyncio.wait_for(read(), None if until is None else max(0.0, until - time.monotonic()))
    except TimeoutError:
        raise HTTPException(408, f"the upload was not complete in time ({len(body)} bytes read); "
                                 "send it faster or use a smaller image") from None
    return bytes(body)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


def multipart_file(body: bytes, content_type: str, name: str, max_size: int) -> tuple[bytes, str]:
    """Return the bytes and declared type of the file field `name` of a multipart/form-data body.

    Raises HTTPException: 400 for a malformed form or no such file field, 413 for a part over `max_size`.
    """
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart/form-data upload without a boundary")
    parts: list[_Part] = []
    header = [bytearray(), bytearray()]

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise HTTPException(400, f"the form has more than {MAX_PARTS} fields; send the image as field '{name}'")
        parts.append(_Part())

    def on_header_end() -> None:
        parts[-1].headers[bytes(header[0]).lower()] = bytes(header[1])
        header[0].clear()
        header[1].clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data.extend(data[start:end])
        if len(parts[-1].data) > max_size:
            raise HTTPException(413, f"image of over {max_size - 1} bytes is over the limit")

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_end": on_header_end, "on_part_data": on_part_data,
        "on_header_field": lambda data, start, end: header[0].extend(data[start:end]),
        "on_header_value": lambda data, start, end: header[1].extend(data[start:end]),
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise HTTPException(400, f"malformed multipart/form-data upload: {e}") from None
    for part in parts:
        _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
        if options.get(b"name") == name.encode() and b"filename" in options:
            return bytes(part.data), part.headers.get(b"content-type", b"").decode("latin-1")
    raise HTTPException(400, f"send the image as a multipart file field named '{name}'")
