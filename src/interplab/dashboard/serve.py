"""`interplab dashboard serve SITE`: serve a dashboard folder over HTTP, for convenience (file:// works too).

Safety: the server binds to 127.0.0.1 unless another host is given explicitly (then it warns: anyone who can reach
that address can read the site), answers only GET and HEAD, and serves only regular files inside SITE. A request
path is percent-decoded once, then refused with 403 if any segment is `..` or `.`, holds a NUL, a backslash or a
drive, or if the file it names resolves (symlinks followed) outside SITE; anything else not found is a 404.
Directory listings are never produced: a folder is served as its index.html or not at all.

DNS rebinding: a web page on evil.example can point its own name at 127.0.0.1 and then read this server as if it
were its own site, unless the server looks at the name the browser asked for. So every request must carry exactly
one Host header naming this server: localhost, 127.0.0.1 or [::1], or the bound address, each with the bound port
(on a wildcard bind, 0.0.0.0 or ::, any IP address with the port, since rebinding needs a DNS name; to reach the
site by a machine name, bind to that name with --host). Anything else gets 403 and no file.
"""

from __future__ import annotations

import ipaddress
import mimetypes
import os
import shutil
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from interplab.dashboard.configs import ServeConfig
from interplab.errors import InterplabError


PAGE_POLICY = "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'"
"""The Content-Security-Policy of every page interplab writes: no inline or foreign scripts (the pages need none: a
corpus string that somehow became markup still could not run), nothing fetched from another host, no plugins, no
<base>. The dashboard pages carry it in a <meta> tag (so it holds over file:// too), and so do `report runs` pages
(which add the hash of their one inline stylesheet). A <meta> policy cannot hold frame-ancestors; the server adds it."""

# Served with every file: no sniffing a .js as something else, the page policy (framing refused too), no referrer
# leaking the site's paths.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": f"{PAGE_POLICY}; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a rebuilt site must show its new data on reload
}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml",
                 ".png": "image/png"}


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host header values (lowercase) a server bound to (host, port) answers: the loopback names and the bound
    address, with the port (and without it on port 80, where browsers leave it out)."""
    names = {"localhost", "127.0.0.1", "[::1]", f"[{host}]" if ":" in host else host}
    out = {f"{name.lower()}:{port}" for name in names}
    return frozenset(out | ({name.lower() for name in names} if port == 80 else set()))


def host_allowed(value: str | None, allowed: frozenset[str], port: int, wildcard: bool) -> bool:
    """Whether a request's Host header `value` names this server (see the module docstring)."""
    if not value:
        return False
    value = value.strip().lower()
    if value in allowed:
        return True
    if not wildcard:
        return False
    name, sep, got_port = value.rpartition(":")
    if not sep or got_port != str(port):
        name, got_port = value, ""
        if port != 80:
            return False
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return False
    return True


def resolve_request(root: Path, raw_path: str) -> tuple[int, Path | None]:
    """Map a request target to a file under the (resolved) folder `root`: (200, file), or (403 | 404, None)."""
    path = unquote(urlsplit(raw_path).path, errors="strict")
    if not path.startswith("/"):
        return HTTPStatus.NOT_FOUND, None
    parts = [p for p in path.split("/") if p]
    for part in parts:
        if part in (".", "..") or "\x00" in part or "\\" in part or os.path.isabs(part) or os.path.splitdrive(part)[0]:
            return HTTPStatus.FORBIDDEN, None
    target = root.joinpath(*parts)
    if target.is_dir():
        target = target / "index.html"
    resolved = target.resolve()  # follows symlinks: a link inside the site pointing out resolves outside
    if resolved != root and root not in resolved.parents:
        return HTTPStatus.FORBIDDEN, None
    if not resolved.is_file():
        return HTTPStatus.NOT_FOUND, None
    return HTTPStatus.OK, resolved


class SiteHandler(BaseHTTPRequestHandler):
    """Serves the files of `self.server.root` (see the module docstring for what is refused)."""

    server_version = "interplab-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, send_body: bool) -> None:
        server: SiteServer = self.server  # type: ignore[assignment]
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or not host_allowed(hosts[0], server.allowed, server.server_address[1], server.wildcard):
            self.send_error(HTTPStatus.FORBIDDEN)  # a DNS-rebound or foreign name: no file, nothing echoed
            return
        try:
            status, path = resolve_request(server.root, self.path)
        except (UnicodeDecodeError, ValueError, OSError):  # undecodable escapes, over-long names
            status, path = HTTPStatus.NOT_FOUND, None
        if path is None:
            self.send_error(status)  # never echo the request path back
            return
        try:
            f = path.open("rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", CONTENT_TYPES.get(path.suffix.lower())
                             or mimetypes.guess_type(path.name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(size))
            for key, value in SECURITY_HEADERS.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                shutil.copyfileobj(f, self.wfile)


class SiteServer(ThreadingHTTPServer):
    """A threading HTTP server over one site folder; IPv6 when the host is an IPv6 address."""

    daemon_threads = True

    def __init__(self, root: Path, address: tuple[str, int]) -> None:
        self.root = root
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, SiteHandler)
        self.wildcard = address[0] in ("0.0.0.0", "::", "")
        self.allowed = allowed_hosts(address[0], self.server_address[1])  # the real port when 0 was asked

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def make_server(cfg: ServeConfig) -> SiteServer:
    """A bound, not yet running server for `cfg` (call `.serve_forever()`; `.url` says where it listens)."""
    cfg.validate()
    if not is_loopback(cfg.host):
        print(f"warning: serving {cfg.site} on {cfg.host}, not loopback: anyone who can reach this address can "
              "read the dashboard", file=sys.stderr)
    try:
        return SiteServer(Path(cfg.site).resolve(), (cfg.host, cfg.port))
    except OSError as e:
        raise InterplabError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}; pick another --port "
                             "(0 picks a free one)") from e


def serve(cfg: ServeConfig) -> None:
    """Serve `cfg.site` until interrupted (Ctrl-C)."""
    server = make_server(cfg)
    print(f"serving {cfg.site} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
