"""HTTP/1.1 by hand, for requests no client library would send as written."""

from __future__ import annotations

import contextlib

import httpx
import trio

__all__ = ["RawConnection"]


class RawConnection:
    """One client connection driven by hand: partial bodies, pauses, the server hanging up."""

    def __init__(self, stream: trio.SocketStream, host: str = "registry") -> None:
        self.stream = stream
        # The Host every request names: the address connected to (the admin API answers a
        # server without authentication only when addressed by a loopback name).
        self.host = host
        self._buffer = b""

    @classmethod
    async def open(cls, url: str) -> RawConnection:
        address = url.removeprefix("http://")
        host, port = address.rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host, int(port)), address)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_head(
        self, method: str, target: str, headers: dict[str, str], version: str = "HTTP/1.1"
    ) -> None:
        target = httpx.URL(target).raw_path.decode()  # a Location is absolute
        lines = [f"{method} {target} {version}", f"Host: {self.host}"]
        lines += map(": ".join, headers.items())
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def response(self, method: str = "GET") -> httpx.Response:
        """The next response, read whole (a HEAD response has no body)."""
        while b"\r\n\r\n" not in self._buffer:
            await self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = httpx.Headers([tuple(line.split(": ", 1)) for line in header_lines])
        length = 0 if method == "HEAD" else int(headers.get("content-length", "0"))
        while len(self._buffer) < length:
            await self._fill()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)

    async def wait_closed(self) -> float:
        """Seconds until the server hangs up; nothing else may arrive meanwhile."""
        started = trio.current_time()
        with contextlib.suppress(trio.BrokenResourceError):  # a reset counts as closed
            while data := await self.stream.receive_some(1 << 16):
                raise AssertionError(f"unexpected data before the close: {data[:200]!r}")
        return trio.current_time() - started

    async def _fill(self) -> None:
        data = await self.stream.receive_some(1 << 16)
        if not data:
            raise AssertionError(f"connection closed mid-response: {self._buffer[:200]!r}")
        self._buffer += data
