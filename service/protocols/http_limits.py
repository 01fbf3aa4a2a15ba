"""Connection-level limits for `exitserve serve` (uvicorn's httptools protocol, with guards).

Enforced before the HTTP parser sees the bytes, because the parser itself is the cost: httptools
grows a header by concatenation, so one 64 MiB header stalled every client for seconds.

* request line + headers above `max_header_bytes`, or more than `max_headers` fields: 431, closed;
* a connection whose request headers are not complete within `header_timeout_s` (one that never
  sends a byte included) is closed; idle kept-alive connections close after `keep_alive_timeout_s`
  (uvicorn's own timer).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from exitserve.service.settings import Settings

_END_OF_HEAD = b"\r\n\r\n"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = 16384
    max_headers = 100
    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False
        self._start_head()  # a connection that never sends a byte is closed too

    def _start_head(self) -> None:
        """A new request head is expected: count its bytes and lines, and time it."""
        self._in_head = True
        self._head_bytes = 0
        self._head_lines = 0
        self._tail = b""
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
        self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            window = self._tail + data
            end = window.find(_END_OF_HEAD)
            head = window[len(self._tail):] if end < 0 else window[len(self._tail):end + len(_END_OF_HEAD)]
            self._tail = window[-3:]
            self._head_bytes += len(head)
            self._head_lines += head.count(b"\n")
            if self._head_bytes > self.max_header_bytes or self._head_lines > self.max_headers + 2:
                self._refuse_head()
                return
        super().data_received(data)

    def _refuse_head(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        body = (b'{"error": "request headers exceed the limit of %d bytes or %d fields"}'
                % (self.max_header_bytes, self.max_headers))
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_begin(self) -> None:
        # The next request on a kept-alive connection starts here (its first byte). Not at the end of
        # the previous response: the rest of a body the app did not read may still be arriving, and
        # would be counted as a head. Between requests uvicorn's keep-alive timer closes idle connections.
        if not self._in_head:
            self._start_head()
        super().on_message_begin()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def guarded_protocol(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with this server's limits."""
    return type("ExitserveHttpProtocol", (GuardedHttpToolsProtocol,), {
        "max_header_bytes": settings.max_header_bytes, "max_headers": settings.max_headers,
        "header_timeout_s": settings.header_timeout_s,
    })


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What `serve` passes to uvicorn.run for the connection limits."""
    return {"http": guarded_protocol(settings), "timeout_keep_alive": max(1, round(settings.keep_alive_timeout_s)),
            "h11_max_incomplete_event_size": settings.max_header_bytes}
