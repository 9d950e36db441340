"""This host in its pool: its TLS identity, who may call it, the peers it copies to.

Owns ``PoolConfig``, read from ``<etc_dir>/pool.json`` (``Paths.etc_dir``:
``/etc/sm`` on a host; relative file names are relative to that file)::

    {"cert": "tls/host-a.pem", "key": "tls/host-a.key", "ca": "tls/ca.pem",
     "allow": ["host-b", "admin"],
     "peers": [{"name": "host-b", "url": "https://10.0.0.2:8443/", "cert_name": "host-b"}]}

- ``server_context()``: the dispatcher's TCP listener: mutual TLS (1.2 at
  least), this host's certificate, every client's certificate verified
  against ``ca`` (signature, dates); ``client_names(cert)`` gives the names a
  verified certificate carries (DNS subjectAltNames and CN), one of which must
  be in ``allow``.
- ``client_context()``: a connection to a dispatcher or a peer: this host's
  certificate presented, the server's verified against ``ca``; the caller
  names the server name to expect (a peer's ``cert_name``).
- ``peer(url)``: VDI.copy goes only to a peer listed here (matched on scheme,
  host and port); any other URL is ``REMOTE_NOT_A_PEER``.  A peer with an
  ``http://`` URL is refused unless it is on loopback and marked
  ``"insecure": true`` (a benchmark's plain-HTTP peer, never a real host).

The file names key files, never holds keys: keys stay in their own files,
mode 0600 (``scripts/make-certs``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.parse
from pathlib import Path

from smcommon.errors import BackendError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from typing import Any

    from smcommon.paths import Paths

CONFIG_NAME = "pool.json"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


class Peer:
    """A host this one copies VDIs to: its name, URL and certificate name."""

    __slots__ = ("cert_name", "insecure", "name", "url")

    def __init__(self, name: str, url: str, cert_name: str, insecure: bool = False) -> None:
        self.name = name
        self.url = url
        self.cert_name = cert_name
        self.insecure = insecure

    def __repr__(self) -> str:
        return f"Peer({self.name!r}, {self.url!r}, cert_name={self.cert_name!r})"


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; BackendError REMOTE_URL_INVALID."""
    p = urllib.parse.urlparse(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise BackendError(
            "REMOTE_URL_INVALID", [f"url {url!r}: a host is named by https://HOST:PORT/"]
        )
    try:
        port = p.port or (443 if p.scheme == "https" else 80)
    except ValueError:
        raise BackendError("REMOTE_URL_INVALID", [f"url {url!r}: bad port"]) from None
    return p.scheme, p.hostname.lower(), port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class PoolConfig:
    """See the module doc; ``load`` reads the host's file (absent: an empty config)."""

    def __init__(
        self,
        cert: str | None = None,
        key: str | None = None,
        ca: str | None = None,
        allow: list[str] | None = None,
        peers: list[Peer] | None = None,
        source: str = "",
    ) -> None:
        self.cert = cert
        self.key = key
        self.ca = ca
        self.allow = list(allow or [])
        self.peers = list(peers or [])
        self.source = source

    @classmethod
    def load(cls, paths: Paths, path: str | os.PathLike[str] | None = None) -> PoolConfig:
        """The host's ``pool.json`` (or ``path``, which must then exist)."""
        where = Path(path) if path is not None else paths.etc_dir / CONFIG_NAME
        try:
            doc = json.loads(where.read_bytes())
        except FileNotFoundError:
            if path is not None:
                raise BackendError("POOL_CONFIG_INVALID", [f"{where} does not exist"]) from None
            return cls(source=str(where))
        except (OSError, ValueError) as e:
            raise BackendError("POOL_CONFIG_INVALID", [f"{where}: {e}"]) from None
        return cls.from_doc(doc, where)

    @classmethod
    def from_doc(cls, doc: Any, where: Path) -> PoolConfig:
        def bad(what: str) -> BackendError:
            return BackendError("POOL_CONFIG_INVALID", [f"{where}: {what}"])

        if not isinstance(doc, dict):
            raise bad("not a JSON object")
        unknown = sorted(set(doc) - {"cert", "key", "ca", "allow", "peers"})
        if unknown:
            raise bad(f"unknown keys {unknown} (cert, key, ca, allow, peers)")

        def file(key: str) -> str | None:
            v = doc.get(key)
            if v is None:
                return None
            if not isinstance(v, str) or not v:
                raise bad(f"{key} must be a file name")
            return v if os.path.isabs(v) else str(where.parent / v)

        allow = doc.get("allow", [])
        if not isinstance(allow, list) or not all(_is_name(a) for a in allow):
            raise bad("allow must be a list of certificate names (letters, digits, . - _)")
        peers_doc = doc.get("peers", [])
        if not isinstance(peers_doc, list):
            raise bad("peers must be a list")
        peers = []
        for p in peers_doc:
            if not isinstance(p, dict) or not _is_name(p.get("name")) or not isinstance(
                p.get("url"), str
            ):
                raise bad(f"a peer needs a name and a url: {p!r}")
            cert_name = p.get("cert_name", p["name"])
            if not _is_name(cert_name):
                raise bad(f"peer {p['name']}: cert_name must be a certificate name")
            try:
                scheme, host, _port = origin(p["url"])
            except BackendError as e:
                raise bad(f"peer {p['name']}: {e.details[0]}") from None
            insecure = p.get("insecure", False) is True
            if scheme == "http" and not (insecure and is_loopback(host)):
                raise bad(
                    f"peer {p['name']}: {p['url']} is plain HTTP: peers are reached over "
                    "https (http only for a peer on loopback marked \"insecure\": true)"
                )
            peers.append(Peer(p["name"], p["url"], str(cert_name), insecure))
        return cls(file("cert"), file("key"), file("ca"), allow, peers, str(where))

    # -- TLS -----------------------------------------------------------------------

    def has_identity(self) -> bool:
        return bool(self.cert and self.key and self.ca)

    def _require(self) -> tuple[str, str, str]:
        missing = [k for k in ("cert", "key", "ca") if not getattr(self, k)]
        if missing:
            raise BackendError(
                "TLS_NOT_CONFIGURED",
                [f"this host has no TLS {', '.join(missing)} ({self.source or 'no pool.json'})"],
            )
        assert self.cert and self.key and self.ca
        return self.cert, self.key, self.ca

    def server_context(self) -> ssl.SSLContext:
        import ssl

        cert, key, ca = self._require()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        # no TLS 1.3 session tickets: they make a client's socket readable with
        # nothing for it to read (a sender looks for an early answer that way)
        ctx.num_tickets = 0
        _load(ctx, cert, key, ca)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Presents this host's certificate; verifies the server's against ``ca``
        and its name (pass ``server_hostname`` when wrapping)."""
        import ssl

        cert, key, ca = self._require()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _load(ctx, cert, key, ca)
        return ctx

    # -- peers -----------------------------------------------------------------------

    def peer(self, url: str) -> Peer:
        """The configured peer ``url`` names; BackendError REMOTE_NOT_A_PEER if none."""
        where = origin(url)
        for p in self.peers:
            if origin(p.url) == where:
                return p
        known = ", ".join(f"{p.name} ({p.url})" for p in self.peers) or "none"
        raise BackendError(
            "REMOTE_NOT_A_PEER",
            [
                (
                    f"url {url!r} is not a peer of this host: VDI.copy goes only to the "
                    f"peers listed in {self.source or 'pool.json'} (known: {known})"
                )
            ],
        )

    def allowed(self, names: list[str]) -> bool:
        return any(n in self.allow for n in names)


def _is_name(v: object) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 253 and set(v) <= NAME_CHARS


def _load(ctx: ssl.SSLContext, cert: str, key: str, ca: str) -> None:
    import ssl

    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as e:
        raise BackendError(
            "TLS_CONFIG_INVALID", [f"cert {cert}, key {key}, ca {ca}: {e}"]
        ) from None


def client_names(cert: dict[str, Any] | None) -> list[str]:
    """The names a verified certificate (``SSLSocket.getpeercert()``) carries:
    its DNS subjectAltNames, then its common name."""
    if not cert:
        return []
    names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName" and v not in names:
                names.append(v)
    return names
