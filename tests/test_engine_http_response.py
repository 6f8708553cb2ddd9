"""engine/http_response.py against h11 as the oracle: the heads it writes are the bytes h11
writes for the same response, and its keep-alive verdict is h11's."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wirechat.engine.errors import LocalProtocolError
from wirechat.engine.http_response import keeps_alive, reason, response_head

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
VALUE = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20
).map(str.encode)
# Names h11 treats specially (framing, connection) are left to the engine's own tests.
NAME = TOKEN.filter(lambda n: n not in ("content-length", "transfer-encoding", "connection")).map(
    str.encode
)


def served(raw: bytes) -> tuple[h11.Connection, h11.Request]:
    """An h11 server connection that has read the request ``raw``, and the request."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    return conn, request


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([200, 201, 400, 401, 404, 413, 429, 500, 502, 503, 504, 599]),
    st.lists(st.tuples(NAME, VALUE), max_size=6),
    st.binary(max_size=30),
)
def test_a_head_is_the_bytes_h11_writes(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    headers = [*headers, (b"content-length", b"%d" % len(body))]
    conn, _ = served(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    expected = conn.send(h11.Response(status_code=status, headers=headers, reason=reason(status)))
    assert response_head(status, headers) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"1.0", b"1.1"]),
    st.lists(
        st.sampled_from([b"close", b"Close", b" keep-alive", b"upgrade", b"closed", b"CLOSE "]),
        min_size=1,
        max_size=3,
    ).map(b",".join),
    st.integers(min_value=0, max_value=2),
)
def test_keep_alive_is_h11s_verdict(version: bytes, connection: bytes, times: int) -> None:
    fields = b"Connection: %s\r\n" % connection.strip() * times
    conn, request = served(b"GET / HTTP/%s\r\nHost: a\r\n%s\r\n" % (version, fields))
    conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    assert keeps_alive(request.http_version, list(request.headers)) is (conn.our_state is h11.DONE)


@pytest.mark.parametrize(
    "field",
    [(b"x-a", b"one\r\nx-injected: two"), (b"x-a", b"bare\nlf"), (b"x-a\r", b"v")],
)
def test_a_cr_or_lf_inside_a_field_is_our_bug(field: tuple[bytes, bytes]) -> None:
    with pytest.raises(LocalProtocolError, match="CR or LF"):
        response_head(200, [(b"content-type", b"text/plain"), field])


def test_an_unknown_status_has_an_empty_reason_like_h11() -> None:
    assert response_head(599, []) == b"HTTP/1.1 599 \r\n\r\n"
