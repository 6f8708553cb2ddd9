"""``GET /``: the web playground as the engine serves it (an ``h11`` client as the oracle).

The page is data passed in through ``EngineConfig(playground=...)``; without it ``/`` stays a
404, which the rest of the engine tests rely on.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from engine_peer import HOST, EnginePeer
from wirechat.engine import AuthMode, EngineConfig, StaticKey, Surface
from wirechat.engine.openapi import openapi_document
from wirechat.engine.playground import Playground

from wirechat.playground import load

PAGE = b"<!doctype html><style>p{color:red}</style><p>hi</p><script>go()</script>"


def sha256(text: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text).digest()).decode() + "'"


def config(**fields: Any) -> EngineConfig:
    return EngineConfig(playground=Playground.from_html(PAGE), **fields)


def test_get_slash_is_the_page_with_its_headers() -> None:
    reply = EnginePeer(config()).get("/")
    assert reply.status == 200
    assert reply.body == PAGE
    assert reply.header("content-type") == "text/html; charset=utf-8"
    assert reply.header("content-length") == str(len(PAGE))
    assert reply.header("x-content-type-options") == "nosniff"
    assert reply.header("cache-control") == "no-cache"
    assert reply.header("x-request-id")
    csp = reply.header("content-security-policy")
    assert csp is not None
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == sha256(b"go()")
    assert directives["style-src"] == sha256(b"p{color:red}")
    assert directives["connect-src"] == f"'self' ws://{HOST} wss://{HOST}"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp


def test_head_has_the_get_headers_and_no_body() -> None:
    peer = EnginePeer(config())
    peer.request("HEAD", "/")
    reply = peer.last_reply()
    assert reply.status == 200
    assert reply.body == b""
    assert reply.header("content-length") == str(len(PAGE))
    assert reply.header("content-security-policy")


def test_page_needs_no_token_when_auth_is_enforced() -> None:
    keys = (StaticKey.from_token("sekrit"),)
    peer = EnginePeer(config(auth_mode=AuthMode.STATIC, static_keys=keys))
    assert peer.get("/").status == 200
    assert peer.get("/v1/models").status == 401  # the rest stays behind the token


@pytest.mark.parametrize("target", ["/?x=1", "/"])
def test_query_is_ignored(target: str) -> None:
    assert EnginePeer(config()).get(target).body == PAGE


def test_other_methods_are_405() -> None:
    peer = EnginePeer(config())
    peer.request("POST", "/", [("Content-Type", "text/plain")], b"x")
    reply = peer.last_reply()
    assert reply.status == 405
    assert reply.header("allow") == "GET, HEAD, OPTIONS"


@pytest.mark.parametrize("target", ["/v1/", "/index.html", "//"])
def test_only_slash_is_the_page(target: str) -> None:
    assert EnginePeer(config()).get(target).status == 404


def test_without_a_page_slash_is_404() -> None:
    reply = EnginePeer(EngineConfig()).get("/")
    assert reply.status == 404
    assert reply.json["error"]["code"] == "unknown_url"


@pytest.mark.parametrize("surface", [Surface.CHAT_SERVER, Surface.WORKER])
def test_surfaces_without_chat_do_not_serve_it(surface: Surface) -> None:
    # The page talks to /chat, which only `serve` has.
    assert EnginePeer(config(surface=surface)).get("/").status == 404


@pytest.mark.parametrize("host", ["evil.test; script-src *", "a b", "x'y", "", "h\u00e9.test"])
def test_a_strange_host_header_leaves_connect_src_self(host: str) -> None:
    csp = Playground.from_html(PAGE).content_security_policy(host)
    assert "connect-src 'self';" in csp
    assert "*" not in csp


def test_ipv6_host_is_named() -> None:
    csp = Playground.from_html(PAGE).content_security_policy("[::1]:8000")
    assert "connect-src 'self' ws://[::1]:8000 wss://[::1]:8000;" in csp


def test_the_packaged_page_is_self_contained() -> None:
    playground = load()
    page = playground.page.decode("utf-8")
    assert page.startswith("<!doctype html>")
    assert len(playground.script_hashes) == 1 and len(playground.style_hashes) == 1
    # Nothing the policy would block: no external resource, no inline handler or style.
    for forbidden in ("http://", "https://", "<script src", "onclick=", "style=", "innerHTML"):
        assert forbidden not in page, forbidden


def test_openapi_lists_the_page_as_public() -> None:
    operation = openapi_document()["paths"]["/"]["get"]
    assert operation["security"] == []
    assert "text/html" in operation["responses"]["200"]["content"]
