"""The gunicorn worker the backend runs under: gunicorn's threaded worker (``gthread``) with every
request read whole in the worker's event loop before a thread is given to it.

Why: gthread hands a connection to one of its few threads as soon as its first byte arrives and
that thread then blocks reading the rest, so eight clients that trickle their headers (or a body)
hold all eight threads and ``/health`` stops answering for everyone, before any authentication.
gunicorn's own advice is a buffering proxy in front (nginx); this worker does the same buffering
in the process, so the embedded default is safe with no second server:

* a connection is read without blocking in the event loop until its request is complete (headers,
  and a ``Content-Length`` body or a chunked body's last chunk); only then does a thread parse and
  answer it, from memory. A slow client costs a socket and its bytes, never a thread.
* the whole request must arrive within ``ADCLICK_REQUEST_READ_TIMEOUT`` seconds (default 60) of
  its first byte; a connection that is later is closed. Blocking socket operations in a thread
  (writing the answer to a client that does not read it, draining a body) time out after the same
  number of seconds.
* at most ``ADCLICK_READ_BUFFER_MB`` (default 4 x ``ADCLICK_MAX_REQUEST_MB``) of unfinished requests
  are held in memory; a request that would pass that gets ``503`` and its connection is closed.
  A request head is at most 64 kB (larger: ``431``); a body above ``ADCLICK_MAX_REQUEST_MB`` is not
  buffered but handed on at once, for the application's ``413``.
* the number of open connections is gunicorn's ``worker_connections`` (``gunicorn.conf.py``: 256);
  beyond it new connections wait in the listen backlog.

Written against gunicorn 27's ``ThreadWorker`` (``requirements.txt`` pins the major version).
"""
from __future__ import annotations

import errno
import selectors
import socket
import time
from functools import partial

from gunicorn.workers.gthread import TConn, ThreadWorker

from .budget import max_request_bytes
from .env import env_float

MAX_HEAD_BYTES = 64 * 1024


def request_read_timeout() -> float:
    return env_float("ADCLICK_REQUEST_READ_TIMEOUT", 60.0, positive=True)


def read_buffer_bytes() -> int:
    request_mb = max_request_bytes() / 2**20
    return int(env_float("ADCLICK_READ_BUFFER_MB", 4 * request_mb, positive=True) * 1024 * 1024)


class TimedSocket(socket.socket):
    """A client socket whose *blocking* mode is a timeout: gunicorn puts a socket into blocking
    mode before a thread reads or writes it, and a blocking operation must not wait forever."""

    io_timeout: float = 60.0

    @classmethod
    def adopt(cls, sock: socket.socket, io_timeout: float) -> "TimedSocket":
        out = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        out.io_timeout = io_timeout
        return out

    def setblocking(self, flag: bool) -> None:
        if flag:
            self.settimeout(self.io_timeout)
        else:
            super().setblocking(False)


def request_complete(buf: bytes | bytearray, max_body: int) -> bool | int:
    """Whether ``buf`` holds a whole HTTP/1 request (or enough of one for the application to refuse
    it): ``True``/``False``, or an HTTP status (``431``) the worker answers itself."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 431 if len(buf) > MAX_HEAD_BYTES else False
    if end > MAX_HEAD_BYTES:
        return 431
    length, chunked = None, False
    for line in bytes(buf[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return True  # gunicorn's parser answers the malformed header with a 400
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    body = len(buf) - (end + 4)
    if chunked:
        # the last chunk (no trailers: what HTTP clients send); a request too large to be accepted
        # goes on at once, so the application's 413 answers it
        return body > max_body or bytes(buf[-5:]) == b"0\r\n\r\n"
    if length is None or length > max_body:
        return True
    return body >= length


_STATUS_LINES = {431: b"431 Request Header Fields Too Large", 503: b"503 Service Unavailable",
                 408: b"408 Request Timeout"}


class BufferingThreadWorker(ThreadWorker):
    """gthread, with each request read whole in the event loop before a thread takes it (above)."""

    def init_process(self):
        self.read_timeout = request_read_timeout()
        self.max_body = max_request_bytes()
        self.buffer_budget = read_buffer_bytes()
        self.buffered = 0
        self.reading: dict[TConn, float] = {}  # connection -> deadline for its whole request
        super().init_process()

    # connections enter here: new ones from accept(), kept-alive ones when their next request starts
    def accept(self, listener):
        if self.cfg.is_ssl:  # TLS bytes cannot be framed here: terminate TLS in a proxy in front
            return super().accept(listener)
        try:
            client, addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, TimedSocket.adopt(client, self.read_timeout), addr, listener.getsockname())
        self._start_reading(conn)

    def on_client_socket_readable(self, conn, client):
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._start_reading(conn)

    def enqueue_req(self, conn):
        if self.cfg.is_ssl or getattr(conn, "request_buffered", False):
            conn.request_buffered = False
            return super().enqueue_req(conn)
        # gthread hands a kept-alive connection straight back to a thread when the last body read
        # took bytes of the next request along: read that request whole here first, too
        self._start_reading(conn, conn.parser.unreader.take_buffered() if conn.parser is not None else b"")

    def _start_reading(self, conn: TConn, already: bytes = b"") -> None:
        conn.prebuffer = bytearray()
        conn.sock.setblocking(False)
        self.reading[conn] = time.monotonic() + self.read_timeout
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_request_bytes, conn))
        if already:
            self._take(conn, already)

    def _stop_reading(self, conn: TConn) -> None:
        self.reading.pop(conn, None)
        self.buffered -= len(conn.prebuffer)
        try:
            self.poller.unregister(conn.sock)
        except (OSError, KeyError, ValueError):
            pass

    def _drop(self, conn: TConn, status: int | None = None) -> None:
        self._stop_reading(conn)
        conn.prebuffer = bytearray()
        if status is not None:
            try:  # best effort: the client may not be reading
                conn.sock.send(b"HTTP/1.1 " + _STATUS_LINES[status]
                               + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
        self.nr_conns -= 1
        conn.close()

    def _on_request_bytes(self, conn: TConn, _sock) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before its request was complete
            self._drop(conn)
            return
        self._take(conn, data)

    def _take(self, conn: TConn, data: bytes) -> None:
        if self.buffered + len(data) > self.buffer_budget:
            self.log.warning("request read buffers full (%d bytes, ADCLICK_READ_BUFFER_MB): 503", self.buffered)
            self._drop(conn, 503)
            return
        conn.prebuffer += data
        self.buffered += len(data)
        state = request_complete(conn.prebuffer, self.max_body)
        if state is False:
            return
        if state is not True:
            self._drop(conn, state)
            return
        self._stop_reading(conn)
        conn.data_ready = True
        conn.request_buffered = True
        self.enqueue_req(conn)

    def handle(self, conn):
        buf = getattr(conn, "prebuffer", None)
        if buf:
            conn.prebuffer = bytearray()
            conn.init()
            conn.parser.unreader.unread(bytes(buf))
        return super().handle(conn)

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c, deadline in self.reading.items() if deadline <= now]:
            self.log.info("request not read within %.0f s (ADCLICK_REQUEST_READ_TIMEOUT): connection closed",
                          self.read_timeout)
            self._drop(conn, 408)
