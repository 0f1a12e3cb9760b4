"""`interplab dashboard serve`: loopback by default, only files inside the site, no path traversal.

Requests go out raw over http.client (urllib would normalise `..` away before sending)."""

from __future__ import annotations

import http.client
import os
import threading
from pathlib import Path

import pytest

from interplab.dashboard import site
from interplab.dashboard.configs import ServeConfig
from interplab.dashboard.serve import is_loopback, make_server, resolve_request
from interplab.errors import InterplabError

SECRET = "top secret, outside the site"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A site (pages + a tiny data file), a secret beside it, symlinks out of it, and a running server."""
    root = tmp_path_factory.mktemp("serve")
    folder = root / "site"
    site.write_assets(str(folder))
    (folder / "data").mkdir()
    (folder / "data" / "meta.js").write_text("window.INTERPLAB_META = {};\n")
    (root / "secret.txt").write_text(SECRET)
    (root / "outside").mkdir()
    (root / "outside" / "secret.txt").write_text(SECRET)
    os.symlink(root / "secret.txt", folder / "link.txt")
    os.symlink(root / "outside", folder / "linkdir")
    os.symlink(folder / "style.css", folder / "inside-link.css")  # a link that stays inside is fine
    server = make_server(ServeConfig(site=str(folder), port=0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, folder, root
    server.shutdown()
    server.server_close()


def get(server, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_binds_to_loopback_by_default(served) -> None:
    server, _, _ = served
    assert ServeConfig().host == "127.0.0.1"
    assert server.server_address[0] == "127.0.0.1" and server.server_address[1] > 0
    assert server.url == f"http://127.0.0.1:{server.server_address[1]}/"


def test_serves_the_site_files_with_types_and_security_headers(served) -> None:
    server, folder, _ = served
    status, headers, body = get(server, "/")
    assert status == 200 and body == (folder / "index.html").read_bytes()
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in headers["content-security-policy"]
    status, headers, body = get(server, "/latent.html?id=3#x")
    assert status == 200 and body == (folder / "latent.html").read_bytes()
    status, headers, body = get(server, "/data/meta.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and body.startswith(b"window.")
    status, headers, body = get(server, "/common.js", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) == (folder / "common.js").stat().st_size
    status, _, body = get(server, "/inside-link.css")
    assert status == 200 and body == (folder / "style.css").read_bytes()


@pytest.mark.parametrize("path", [
    "/../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E%2Fsecret.txt",
    "/..%2fsecret.txt",
    "/data/../../secret.txt",
    "/data/%2e%2e/%2e%2e/secret.txt",
    "/./../secret.txt",
    "/..%5csecret.txt",
    "/..\\secret.txt",
    "/link.txt",
    "/linkdir/secret.txt",
    "/%00../secret.txt",
    "http://127.0.0.1/../secret.txt",
])
def test_traversal_is_refused(served, path: str) -> None:
    server, _, _ = served
    status, _, body = get(server, path)
    assert status == 403, (path, status)
    assert SECRET.encode() not in body


@pytest.mark.parametrize("path", ["//etc/passwd", "ABSOLUTE", "/missing.js", "/data/", "/%252e%252e/secret.txt",
                                  "/%ff", "*"])
def test_absolute_missing_and_folders_are_not_found(served, path: str) -> None:
    server, _, root = served
    if path == "ABSOLUTE":  # the secret's absolute path: read as a path inside the site, where nothing is
        path = str(root / "secret.txt")
    status, _, body = get(server, path)
    assert status == 404, (path, status)
    assert SECRET.encode() not in body and b"Directory listing" not in body


def test_errors_do_not_echo_the_request_and_other_methods_are_refused(served) -> None:
    server, _, _ = served
    status, _, body = get(server, "/%3Cscript%3Ealert(1)%3C/script%3E")
    assert status == 404 and b"<script>" not in body and b"alert" not in body
    status, _, _ = get(server, "/index.html", method="POST")
    assert status == 501


def test_resolve_request_directly(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.html").write_text("x")
    root = tmp_path.resolve()
    assert resolve_request(root, "/a/") == (200, root / "a" / "index.html")
    assert resolve_request(root, "/a/index.html?q=1") == (200, root / "a" / "index.html")
    assert resolve_request(root, "/a/%2e%2e/%2e%2e/x")[0] == 403
    assert resolve_request(root, "/")[0] == 404  # no index.html at the root, and never a listing


def test_other_hosts_only_when_asked_and_with_a_warning(served, capsys) -> None:
    _, folder, _ = served
    server = make_server(ServeConfig(site=str(folder), host="0.0.0.0", port=0))
    server.server_close()
    assert "warning" in capsys.readouterr().err
    server = make_server(ServeConfig(site=str(folder), host="127.0.0.1", port=0))
    server.server_close()
    assert "warning" not in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.3.2.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


def test_bad_configs_raise_clear_errors(served, tmp_path: Path) -> None:
    server, folder, _ = served
    with pytest.raises(InterplabError, match="not a dashboard folder"):
        make_server(ServeConfig(site=str(tmp_path), port=0))
    with pytest.raises(InterplabError, match="0..65535"):
        make_server(ServeConfig(site=str(folder), port=70000))
    with pytest.raises(InterplabError, match="cannot listen"):
        make_server(ServeConfig(site=str(folder), port=server.server_address[1]))


def raw_get(server, path: str, hosts: list[str]) -> tuple[int, bytes]:
    """GET with exactly the Host headers given (none, one, or several), sent as written."""
    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("GET", path, skip_host=True)
        for host in hosts:
            conn.putheader("Host", host)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example:{port}",
                                  "127.0.0.1.nip.io:{port}", "127.0.0.1:1", "localhost", "LOCALHOST:1{port}",
                                  "0.0.0.0:{port}", "10.0.0.1:{port}", ""])
def test_a_foreign_host_header_gets_403_and_no_file(served, host: str) -> None:
    """DNS rebinding: a page on evil.example that resolves its name to 127.0.0.1 must not read the site."""
    server, folder, _ = served
    status, body = raw_get(server, "/index.html", [host.format(port=server.server_address[1])])
    assert status == 403, (host, status)
    assert body != (folder / "index.html").read_bytes() and b"interplab feature dashboard" not in body
    assert b"evil" not in body  # the refused name is not echoed


def test_only_the_loopback_names_and_the_bound_port_are_answered(served) -> None:
    server, folder, _ = served
    port = server.server_address[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"):
        status, body = raw_get(server, "/index.html", [host])
        assert status == 200 and body == (folder / "index.html").read_bytes(), host
    assert raw_get(server, "/index.html", [])[0] == 403  # no Host header at all
    assert raw_get(server, "/index.html", [f"127.0.0.1:{port}", "evil.example"])[0] == 403  # two of them


def test_a_wildcard_bind_answers_ip_addresses_but_no_other_name(served) -> None:
    _, folder, _ = served
    server = make_server(ServeConfig(site=str(folder), host="0.0.0.0", port=0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        for host in (f"192.168.1.20:{port}", f"localhost:{port}", f"0.0.0.0:{port}"):
            assert raw_get(server, "/index.html", [host])[0] == 200, host
        for host in (f"evil.example:{port}", "192.168.1.20:1", "192.168.1.20"):
            assert raw_get(server, "/index.html", [host])[0] == 403, host
    finally:
        server.shutdown()
        server.server_close()
