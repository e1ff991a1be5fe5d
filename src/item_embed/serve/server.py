"""What ``item-embed serve`` puts around the app: which Host names it answers, and a read deadline.

- Host: a browser page from another site can reach a service on 127.0.0.1 by DNS rebinding (its own
  name re-pointed at 127.0.0.1); its requests then carry that name as Host. Only the names of the
  bound address are answered (:class:`HostPolicy`); anything else is a 400.
- Read deadline: uvicorn's h11 protocol closes idle keep-alive connections but waits forever for a
  request that arrives slowly (slowloris: a header line every few seconds, or a body that trickles).
  :func:`deadline_protocol` gives each request, headers and body, ``read_timeout`` seconds from the
  connection opening or the previous response; past it the client gets 408 and the connection is
  closed. Time spent answering (the model) does not count.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Iterable

from .security import LOOPBACK_NAMES

DEFAULT_READ_TIMEOUT_S = 60.0
ANY_ADDRESS = ("0.0.0.0", "::", "")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def host_name(header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` -> ``::1``, ``Example.COM:80`` -> ``example.com``."""
    text = header.strip().lower()
    if text.startswith("["):
        return text[1:text.index("]")] if "]" in text else text[1:]
    if text.count(":") == 1:
        text = text.split(":", 1)[0]
    return text.rstrip(".")


@dataclass(frozen=True)
class HostPolicy:
    """Host names a request may carry. ``any_ip``: every IP address literal too (a page reached by an
    address is not a rebinding attack: that needs a name). ``names`` may hold ``*`` (anything)."""

    names: frozenset[str]
    any_ip: bool = False

    @classmethod
    def for_bind(cls, host: str, extra: Iterable[str] = ()) -> "HostPolicy":
        """The names of a server bound to ``host``: loopback -> 127.0.0.1, localhost, ::1; all
        interfaces (0.0.0.0, ::) -> any IP address, localhost and this machine's names; another
        address or name -> itself. Plus each of ``extra`` (``--allowed-host``)."""
        bound = host_name(host)
        names = {bound} if bound else set()
        any_ip = False
        ip = _ip(bound)
        if bound == "localhost" or (ip is not None and ip.is_loopback):
            names.update(LOOPBACK_NAMES)
        elif bound in ANY_ADDRESS:
            any_ip = True
            names.update(LOOPBACK_NAMES)
            for name in (socket.gethostname(), socket.getfqdn()):
                if name:
                    names.add(name.lower())
        names.update(host_name(e) if e.strip() != "*" else "*" for e in extra if e.strip())
        return cls(frozenset(names), any_ip)

    def allows(self, header: str | None) -> bool:
        if "*" in self.names:
            return True
        if not header:
            return False  # HTTP/1.1 requires Host; an HTTP/1.0 client without one is not a browser page
        name = host_name(header)
        if name in self.names:
            return True
        return self.any_ip and _ip(name) is not None

    def describe(self) -> str:
        shown = sorted(self.names)
        return ", ".join(shown + (["any IP address"] if self.any_ip else []))


def _timeout_response(read_timeout: float) -> bytes:
    body = json.dumps({"detail": f"request not received within {read_timeout:g} s: connection closed"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


def deadline_protocol(read_timeout: float = DEFAULT_READ_TIMEOUT_S) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a read deadline: pass it as ``uvicorn.run(..., http=...)``.

    Each request must arrive whole (headers and body) within ``read_timeout`` seconds of the
    connection opening or of the previous response. Past it: 408 (unless a response has started)
    and the connection is closed; a request already received is never cut off while it is answered.
    A connection that sent nothing is closed without a word (as keep-alive ones are).
    """
    if not read_timeout > 0:
        raise ValueError(f"the read timeout must be positive, not {read_timeout}")
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._disarm()
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own deadline

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                return  # the request is in: answering it has no deadline here
            cycle = self.cycle if self.conn.their_state is h11.SEND_BODY else None
            partial = self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0])
            if partial and (cycle is None or not cycle.response_started):
                self.transport.write(_timeout_response(read_timeout))
            if cycle is not None:
                cycle.disconnected = True  # the app's receive() gets http.disconnect, its send() is dropped
                cycle.message_event.set()
            self.logger.info("closed a connection that did not send its request within %g s", read_timeout)
            self.transport.close()

    DeadlineH11Protocol.__name__ = DeadlineH11Protocol.__qualname__ = "DeadlineH11Protocol"
    return DeadlineH11Protocol
