"""Where the backend may download images from, and how much it reads.

A task's image URL is chosen by whoever writes tasks, so the backend must not become a proxy into
the factory network (SSRF). Allowed destinations:

* the Label Studio host (``LABEL_STUDIO_URL``, else the one ``/setup`` named): any address;
* a redirect that the Label Studio host itself answered with (cloud storage: Label Studio
  resolves ``s3://`` etc. to a presigned URL), when the target is a public address;
* hosts listed in ``ADCLICK_ALLOWED_HOSTS`` (comma-separated names, ``*.example.com`` for a domain,
  or ``*`` for every public host).

Every address that is not globally routable is refused unless the host is the Label Studio host or
listed by name: loopback, private, link-local (cloud metadata 169.254.169.254), carrier-grade NAT
(100.64.0.0/10: one cloud serves its metadata at 100.100.100.200), multicast, reserved, and the
IPv6 ranges that embed or stand for an IPv4 address (6to4 2002::/16, NAT64 64:ff9b::/96) or a site
(fec0::/10). A URL is parsed twice, by the standard library and by urllib3 (which the HTTP client
connects with); where the two read another host, port or user part (a backslash or a control
character in the authority), it is refused: the check must see the address the connection goes to. Names are resolved and every
address they resolve to is checked, on every redirect hop (redirects are followed here, not by
requests, so each hop is checked), and the connection goes to the address that was checked (no
second DNS lookup that a rebinding name could answer differently). The Label Studio token only ever goes to the Label Studio host.
Downloads stop at ``max_bytes``.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, DecodeError, NewConnectionError, ProtocolError, ReadTimeoutError
from urllib3.util import connection as urllib3_connection
from urllib3.util import parse_url

from .errors import BackendError, TooLarge

MAX_REDIRECTS = 5


class UrlRefused(BackendError):
    """An image URL outside the download policy (403: the request is understood and refused)."""

    status = 403


def _origin(url: str) -> tuple[str, str, int] | None:
    p = urlparse(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        return None
    try:
        port = p.port or (443 if p.scheme == "https" else 80)
    except ValueError:
        return None
    return p.scheme, p.hostname.lower(), port


# Counted as global by the ipaddress module, yet a way into a private network.
_NOT_PUBLIC = tuple(ipaddress.ip_network(n) for n in ("2002::/16", "64:ff9b::/96", "64:ff9b:1::/48", "fec0::/10"))


def _public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in _NOT_PUBLIC):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


_AMBIGUOUS = set("\\") | {chr(c) for c in range(0x21)} | {chr(0x7F)}


def require_unambiguous(url: str) -> None:
    """Raise ``UrlRefused`` where the standard library and urllib3 (the HTTP client's parser) could
    read ``url``'s authority differently: the policy would check one host and the client connect
    to another (``http://10.0.0.1\\@label-studio/x.png``)."""
    rest = url.split("://", 1)[1] if "://" in url else url
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if any(ch in _AMBIGUOUS for ch in authority):
        raise UrlRefused("image URL refused: its host part holds a backslash, a space or a control character")
    try:
        ours, theirs = urlparse(url), parse_url(url)
        same = ((ours.hostname or "").lower(), ours.port) == ((theirs.host or "").lower().strip("[]"), theirs.port)
    except ValueError:
        same = False
    if not same:
        raise UrlRefused("image URL refused: its host part reads differently to different URL parsers")


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (an IP literal: itself)."""
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise UrlRefused(f"cannot resolve the image host {host!r}: {e.strerror or e}", status=424) from None
    return sorted({info[4][0] for info in infos})


@dataclass(frozen=True)
class UrlPolicy:
    """The download policy for one Label Studio host (``ls_url``, "" = unknown)."""

    ls_url: str = ""
    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = 50 * 1024 * 1024

    @classmethod
    def from_env(cls, ls_url: str) -> "UrlPolicy":
        hosts = tuple(h.strip().lower() for h in os.environ.get("ADCLICK_ALLOWED_HOSTS", "").split(",") if h.strip())
        mb = float(os.environ.get("ADCLICK_MAX_IMAGE_MB", "50"))
        return cls(ls_url=ls_url, allowed_hosts=hosts, max_bytes=int(mb * 1024 * 1024))

    def require_size(self, nbytes: int, what: str) -> None:
        """Raise ``TooLarge`` when ``what`` (an image, ``nbytes`` long) is above ``max_bytes``."""
        if nbytes > self.max_bytes:
            raise TooLarge(f"{what} is above ADCLICK_MAX_IMAGE_MB ({self.max_bytes / 2**20:.0f} MB): "
                           f"{nbytes / 2**20:.1f} MB or more")

    def is_label_studio(self, url: str) -> bool:
        ls = _origin(self.ls_url) if self.ls_url else None
        return ls is not None and _origin(url) == ls

    def _listed(self, host: str) -> str | None:
        """'name' (listed by name), 'any' (``*``: public hosts) or None."""
        for h in self.allowed_hosts:
            if h == host or (h.startswith("*.") and host.endswith(h[1:])):
                return "name"
        return "any" if "*" in self.allowed_hosts else None

    def check(self, url: str, redirected_by_label_studio: bool = False) -> str | None:
        """Raise ``UrlRefused`` unless ``url`` may be fetched. Returns the checked address the
        connection must go to, or None for a host trusted by name (Label Studio, a listed name)."""
        origin = _origin(url)
        if origin is None:
            raise UrlRefused(f"image URL {url!r} is refused: only http(s) URLs are downloaded")
        require_unambiguous(url)
        if self.is_label_studio(url):
            return None
        _, host, port = origin
        listed = self._listed(host)
        if listed is None and not redirected_by_label_studio:
            raise UrlRefused(
                f"image URL {url} is refused: {host} is not the Label Studio host "
                f"({self.ls_url or 'LABEL_STUDIO_URL is not set'}); list it in ADCLICK_ALLOWED_HOSTS "
                "(comma-separated, '*.example.com' for a domain) to allow downloads from it"
            )
        if listed == "name":
            return None
        addresses = resolve_addresses(host, port)
        private = [a for a in addresses if not _public(a)]
        if private:
            raise UrlRefused(
                f"image URL {url} is refused: {host} resolves to the non-public address {private[0]} "
                "(loopback, private or link-local); list the host by name in ADCLICK_ALLOWED_HOSTS "
                "if the backend should download from it"
            )
        return addresses[0]


# ---------------------------------------------------------------- connecting to the checked address
_PINS = threading.local()  # (host, port) -> the address the policy checked, for this thread's hop


class _PinnedConnectionMixin:
    """Connects to the address ``UrlPolicy.check`` approved for this host instead of resolving the
    name again; the Host header, TLS server name and certificate check keep the name."""

    def _new_conn(self):
        pinned = getattr(_PINS, "map", {}).get((self.host.lower(), self.port))
        if pinned is None:
            return super()._new_conn()
        try:
            return urllib3_connection.create_connection((pinned, self.port), self.timeout,
                                                        source_address=self.source_address,
                                                        socket_options=self.socket_options)
        except socket.timeout as e:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from e
        except OSError as e:
            raise NewConnectionError(self, f"Failed to establish a new connection: {e}") from e


class _PinnedHTTPConnection(_PinnedConnectionMixin, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedConnectionMixin, HTTPSConnection):
    pass


class _PinnedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


class _PinnedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PinnedHTTPConnectionPool,
                                                   "https": _PinnedHTTPSConnectionPool}


def _left(deadline: float) -> float:
    """Seconds left before ``deadline`` (``time.monotonic``); ``requests.Timeout`` once it passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise requests.Timeout("the download took longer than ADCLICK_DOWNLOAD_TIMEOUT")
    return left


class PolicySession(requests.Session):
    """A requests session that applies a ``UrlPolicy`` to every hop, sends the Authorization
    header only to the Label Studio host, times out, and reads at most ``policy.max_bytes``."""

    def __init__(self, policy: UrlPolicy, timeout_s: float):
        super().__init__()
        self.policy = policy
        self.timeout_s = timeout_s
        self.trust_env = False  # a proxy from the environment would bypass the address check
        self.mount("http://", _PinnedAdapter())
        self.mount("https://", _PinnedAdapter())

    def request(self, method, url, **kwargs):  # noqa: D401 - requests API
        # ``timeout_s`` bounds the whole download, every hop and every byte of it: requests' own
        # timeout bounds each socket read, so a server sending one byte a second never trips it.
        deadline = time.monotonic() + float(kwargs.pop("timeout", None) or self.timeout_s)
        kwargs["allow_redirects"] = False
        kwargs["stream"] = True
        headers = dict(kwargs.pop("headers", None) or {})
        from_ls = False
        for _ in range(MAX_REDIRECTS + 1):
            address = self.policy.check(url, redirected_by_label_studio=from_ls)
            hop_headers = dict(headers)
            if not self.policy.is_label_studio(url):
                hop_headers = {k: v for k, v in hop_headers.items() if k.lower() != "authorization"}
            _, host, port = _origin(url)
            _PINS.map = {(host, port): address} if address else {}
            try:
                resp = super().request(method, url, headers=hop_headers, timeout=_left(deadline), **kwargs)
            finally:
                _PINS.map = {}
            if not resp.is_redirect:
                self._read_bounded(resp, url, deadline)
                return resp
            from_ls = self.policy.is_label_studio(url)
            url = urljoin(url, resp.headers.get("location", ""))
            resp.close()
        raise UrlRefused(f"more than {MAX_REDIRECTS} redirects downloading the image", status=400)

    def _read_bounded(self, resp: requests.Response, url: str, deadline: float) -> None:
        declared = resp.headers.get("content-length", "")
        chunks, total = [], int(declared) if declared.isdigit() else 0
        try:
            self.policy.require_size(total, f"the image at {url}")
            total = 0
            # read1: whatever has arrived (iter_content waits for a whole chunk, so a trickle of
            # one byte a second would never reach the deadline check)
            while chunk := resp.raw.read1(1 << 16, decode_content=True):
                total += len(chunk)
                self.policy.require_size(total, f"the image at {url}")
                chunks.append(chunk)
                _left(deadline)
        except (TooLarge, requests.Timeout):
            resp.close()
            raise
        except ReadTimeoutError:  # raw reads raise urllib3's own errors: the caller knows requests'
            resp.close()
            raise requests.Timeout("the image server stopped sending") from None
        except (ProtocolError, DecodeError) as e:
            resp.close()
            raise requests.ConnectionError(f"the image download broke off: {type(e).__name__}") from None
        resp._content = b"".join(chunks)  # requests' own slot: .content then serves these bytes
        resp._content_consumed = True
