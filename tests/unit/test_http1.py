"""edge.http1 without sockets: request-head parsing, every refusal, and chunked decoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.http1 import (
    MAX_CHUNK_LINE,
    BadRequest,
    ChunkedDecoder,
    RequestHead,
    find_head_end,
    parse_head,
)


def head(*lines: str, request_line: str = "GET / HTTP/1.1") -> bytes:
    return ("\r\n".join((request_line, *lines)) + "\r\n\r\n").encode("latin-1")


def parse(*lines: str, request_line: str = "GET / HTTP/1.1") -> RequestHead:
    return parse_head(head(*lines, request_line=request_line))


def refused(raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_head(raw)
    return info.value


def refused_lines(*lines: str, request_line: str = "GET / HTTP/1.1") -> int:
    """The status a head made of `lines` is refused with."""
    return refused(head(*lines, request_line=request_line)).status


# --- a valid head -----------------------------------------------------------------------------


def test_simple_get() -> None:
    h = parse("Host: www.example.test", "Accept: */*", "X-A: 1", "x-a: 2")
    assert h.method == "GET"
    assert h.target == b"/"
    assert h.version == 11
    assert h.host == "www.example.test"
    assert h.keep_alive is True
    assert h.content_length == 0 and h.chunked is False
    assert h.expect_continue is False
    assert h.fields == [
        ("Host", "www.example.test"),
        ("Accept", "*/*"),
        ("X-A", "1"),
        ("x-a", "2"),
    ]
    assert h.headers["x-a"] == "1, 2"


def test_field_value_ows_is_trimmed_and_empty_value_kept() -> None:
    h = parse("Host: a.test", "X-Pad: \t  padded \t", "X-Empty:", "X-Tight:tight")
    assert h.headers["x-pad"] == "padded"
    assert h.headers["x-empty"] == ""
    assert h.headers["x-tight"] == "tight"


def test_obs_text_in_field_value_is_kept_as_latin1() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-T: caf\xe9\r\n\r\n"
    assert parse_head(raw).headers["x-t"] == "caf\xe9"


def test_path_and_query() -> None:
    h = parse("Host: a.test", request_line="GET /a/b%20c?x=%41&y HTTP/1.1")
    assert h.target == b"/a/b%20c?x=%41&y"  # never re-quoted
    assert h.path == "/a/b%20c"
    assert h.query == "x=%41&y"


@pytest.mark.parametrize(
    "method", ["PURGE", "FOO", "M-SEARCH", "PROPFIND", "get", "X!#$%&'*+.^_`|~"]
)
def test_unknown_token_methods_are_accepted(method: str) -> None:
    assert parse("Host: a.test", request_line=f"{method} / HTTP/1.1").method == method


def test_leading_empty_lines_are_ignored() -> None:
    raw = b"\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    assert find_head_end(raw) == len(raw)
    h = parse_head(raw[: find_head_end(raw)])
    assert h.method == "GET" and h.host == "a.test"


def test_find_head_end() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n") == -1
    assert find_head_end(b"\r\n") == -1
    assert find_head_end(b"\r\n\r\n") == -1  # only empty lines: no head yet
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert find_head_end(raw + b"NEXT") == len(raw)
    assert find_head_end(raw, start=10) == len(raw)


def test_expect_continue() -> None:
    assert parse("Host: a", "Expect: 100-Continue").expect_continue is True
    assert parse("Host: a", "Expect: something").expect_continue is False
    # RFC 9110 10.1.1: ignored in an HTTP/1.0 request.
    assert parse("Expect: 100-continue", request_line="GET / HTTP/1.0").expect_continue is False


# --- absolute-form and asterisk-form targets -----------------------------------------------------


@pytest.mark.parametrize(
    ("target", "host", "origin_form"),
    [
        ("http://www.example.test/a/b?c=d", "www.example.test", b"/a/b?c=d"),
        ("HTTP://Www.Example.TEST:8080/x", "Www.Example.TEST:8080", b"/x"),
        ("https://www.example.test", "www.example.test", b"/"),
        ("http://www.example.test?q=1", "www.example.test", b"/?q=1"),
        ("http://[::1]:8080/v6", "[::1]:8080", b"/v6"),
    ],
)
def test_absolute_form_takes_host_from_the_uri(target: str, host: str, origin_form: bytes) -> None:
    # RFC 9112 3.2.2: the target's authority wins over the Host header.
    h = parse("Host: other.test", request_line=f"GET {target} HTTP/1.1")
    assert h.host == host
    assert h.target == origin_form


def test_absolute_form_in_http10_needs_no_host() -> None:
    h = parse(request_line="GET http://a.test/x HTTP/1.0")
    assert h.host == "a.test" and h.target == b"/x"


@pytest.mark.parametrize(
    "target",
    [
        "http:///nohost",
        "http://user@a.test/",
        "ftp://a.test/",
        "a.test:443",
        "*",
        "x/y",
        "http://a b/",
    ],
)
def test_bad_other_form_targets(target: str) -> None:
    assert refused_lines("Host: a.test", request_line=f"GET {target} HTTP/1.1") == 400


def test_asterisk_form_for_options() -> None:
    h = parse("Host: a.test", request_line="OPTIONS * HTTP/1.1")
    assert h.target == b"*" and h.host == "a.test"


# --- keep-alive ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        ("1.1", None, True),
        ("1.1", "close", False),
        ("1.1", "Close", False),
        ("1.1", "keep-alive", True),
        ("1.1", "Upgrade, close", False),
        ("1.1", "x-close-notify", True),  # a token, not a substring
        ("1.0", None, False),
        ("1.0", "keep-alive", True),
        ("1.0", "Keep-Alive", True),
        ("1.0", "te, keep-alive", True),
        ("1.0", "keep-alive, close", False),
        ("1.0", "no-keep-alive", False),
    ],
)
def test_keep_alive_rules(version: str, connection: str | None, keep_alive: bool) -> None:
    lines = ["Host: a.test"] + ([f"Connection: {connection}"] if connection else [])
    h = parse(*lines, request_line=f"GET / HTTP/{version}")
    assert h.keep_alive is keep_alive


def test_connection_fields_are_combined() -> None:
    h = parse("Host: a", "Connection: te", "Connection: close")
    assert h.keep_alive is False


# --- bodies -------------------------------------------------------------------------------------


def test_content_length() -> None:
    h = parse("Host: a", "Content-Length: 42", request_line="POST / HTTP/1.1")
    assert h.content_length == 42 and not h.chunked


def test_identical_content_lengths_are_one() -> None:
    assert parse("Host: a", "Content-Length: 7, 7").content_length == 7
    assert parse("Host: a", "Content-Length: 7", "Content-Length: 7").content_length == 7


def test_chunked() -> None:
    h = parse("Host: a", "Transfer-Encoding: Chunked", request_line="POST / HTTP/1.1")
    assert h.chunked and h.content_length == 0


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        ["Content-Length: 5, 6"],
        ["Content-Length: 5", "Content-Length: 6"],
        ["Content-Length: 5", "Content-Length: 5, 6"],
        ["Content-Length: -1"],
        ["Content-Length: +5"],
        ["Content-Length: 0x10"],
        ["Content-Length: "],
        ["Content-Length: 1 2"],
        ["Content-Length: \u00b2"],
        ["Content-Length: 1234567890123456789"],
    ],
)
def test_bad_content_length_is_400(lines: list[str]) -> None:
    assert refused_lines("Host: a", *lines) == 400


@pytest.mark.parametrize(
    "lines",
    [
        ["Content-Length: 5", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding: chunked", "Content-Length: 5"],
        ["Transfer-Encoding: chunked", "Content-Length: 0"],
    ],
)
def test_content_length_with_transfer_encoding_is_400(lines: list[str]) -> None:
    assert refused_lines("Host: a", *lines) == 400


@pytest.mark.parametrize(
    "te",
    ["chunked, gzip", "gzip", "identity", "chunked, chunked", "", "chunked;q=1", "x chunked"],
)
def test_transfer_encoding_not_ending_in_chunked_is_400(te: str) -> None:
    assert refused_lines("Host: a", f"Transfer-Encoding: {te}") == 400


def test_transfer_encoding_split_over_lines_must_still_end_in_chunked() -> None:
    assert refused_lines("Host: a", "Transfer-Encoding: chunked", "Transfer-Encoding: gzip") == 400


@pytest.mark.parametrize("te", ["gzip, chunked", "deflate,chunked", "x-custom, chunked"])
def test_unknown_transfer_coding_is_501(te: str) -> None:
    assert refused_lines("Host: a", f"Transfer-Encoding: {te}") == 501


def test_transfer_encoding_in_http10_is_400() -> None:
    status = refused_lines("Host: a", "Transfer-Encoding: chunked", request_line="POST / HTTP/1.0")
    assert status == 400


def test_obs_fold_is_400() -> None:
    assert refused_lines("Host: a", "X-Long: one", " two") == 400
    assert refused_lines("Host: a", "X-Long: one", "\ttwo") == 400


def test_whitespace_before_colon_is_400() -> None:
    assert refused_lines("Host: a", "Content-Length : 5") == 400
    assert refused_lines("Host\t: a") == 400


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: ab\r\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n",
    ],
)
def test_bare_cr_lf_or_nul_in_value_is_400(raw: bytes) -> None:
    assert refused(raw).status == 400


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nX\rY: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n: novalue\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX(Y): 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX\xe9: 1\r\n\r\n",
    ],
)
def test_bad_field_names_are_400(raw: bytes) -> None:
    assert refused(raw).status == 400


def test_missing_host_in_http11_is_400() -> None:
    assert refused_lines("Accept: */*") == 400
    # absolute-form does not excuse the missing field (RFC 9112 3.2)
    assert refused_lines(request_line="GET http://a.test/ HTTP/1.1") == 400


def test_repeated_host_is_400() -> None:
    assert refused_lines("Host: a.test", "Host: a.test") == 400
    assert refused_lines("Host: a.test", "Host: b.test") == 400
    assert refused_lines("Host: a.test", "host: b.test", request_line="GET / HTTP/1.0") == 400


@pytest.mark.parametrize(
    "host", ["a b.test", "a.test/x", "a@b.test", "caf\u00e9.test", "\u00b2.test", "a.test,b.test"]
)
def test_malformed_host_is_400(host: str) -> None:
    assert refused_lines(f"Host: {host}") == 400


def test_empty_host_is_allowed() -> None:
    assert parse("Host:").host == ""


def test_http10_without_host() -> None:
    h = parse(request_line="GET / HTTP/1.0")
    assert h.host == "" and h.version == 10 and h.keep_alive is False


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/3.0", "HTTP/0.9"])
def test_unsupported_version_is_505(version: str) -> None:
    assert refused_lines("Host: a", request_line=f"GET / {version}") == 505


def test_higher_minor_version_is_served_as_11() -> None:
    # RFC 9110 2.5: process as the highest minor version implemented.
    assert parse("Host: a", request_line="GET / HTTP/1.2").version == 11


@pytest.mark.parametrize(
    "version",
    ["HTTP/1.1x", "http/1.1", "HTTP/1.", "HTTP/11", "HTTP/1.1.1", "HTTP/a.b", "HTTP", "HTTP/2"],
)
def test_malformed_version_is_400(version: str) -> None:
    assert refused_lines("Host: a", request_line=f"GET / {version}") == 400


@pytest.mark.parametrize(
    "request_line",
    [
        "G(T / HTTP/1.1",
        "GET: / HTTP/1.1",
        "G\u00e9T / HTTP/1.1",
        " / HTTP/1.1",
        "GET  / HTTP/1.1",
        "GET / HTTP/1.1 ",
        "GET /",
        "GET",
        "",
    ],
)
def test_malformed_request_line_is_400(request_line: str) -> None:
    assert refused_lines("Host: a", request_line=request_line) == 400


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /\xe9 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a\rb HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_non_ascii_or_control_in_target_is_400(raw: bytes) -> None:
    assert refused(raw).status == 400


def test_refusals_carry_a_reason() -> None:
    e = refused(head("Content-Length: 1", "Transfer-Encoding: chunked", "Host: a"))
    assert e.reason and "\n" not in e.reason


# --- hypothesis: parse_head --------------------------------------------------------------------


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=300))
def test_parse_head_only_raises_bad_request_on_arbitrary_bytes(data: bytes) -> None:
    try:
        h = parse_head(data + b"\r\n\r\n")
    except BadRequest as e:
        assert e.status in (400, 501, 505)
        return
    assert h.version in (10, 11)
    assert h.target[:1] == b"/" or h.target == b"*"


_TOKEN = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    min_size=1,
    max_size=12,
)
_LINE_PIECES = st.sampled_from(
    [
        "Host: a.test",
        "Host:",
        "Content-Length: 3",
        "Content-Length: 3, 4",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: gzip, chunked",
        "Connection: close",
        "Expect: 100-continue",
        " folded",
        "X : y",
        "X: \x00",
        "X: \r",
        "",
        ":",
        "Host: \xe9",
    ]
)


@settings(max_examples=600, deadline=None)
@given(
    method=_TOKEN | st.sampled_from(["", "G T", "GET\x00"]),
    target=st.sampled_from(
        ["/", "/a?b", "*", "http://a.test/x", "http://", "https://a@b/", "/\xe9", "x"]
    ),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.9", "HTP/1.1"]),
    lines=st.lists(
        _LINE_PIECES | st.text(st.characters(max_codepoint=0xFF), max_size=20), max_size=6
    ),
)
def test_parse_head_only_raises_bad_request_on_near_valid_heads(
    method: str, target: str, version: str, lines: list[str]
) -> None:
    raw = head(*lines, request_line=f"{method} {target} {version}")
    try:
        h = parse_head(raw)
    except BadRequest as e:
        assert e.status in (400, 501, 505)
        return
    assert h.method == method
    assert not (h.chunked and "content-length" in h.headers)


@settings(max_examples=300, deadline=None)
@given(
    method=_TOKEN,
    path=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~%/=&?", max_size=40),
    fields=st.lists(
        st.tuples(
            _TOKEN.filter(
                lambda n: n.lower() not in ("host", "content-length", "transfer-encoding")
            ),
            st.text(
                alphabet=st.characters(
                    min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f"
                ),
                max_size=30,
            ),
        ),
        max_size=8,
    ),
)
def test_valid_heads_round_trip(method: str, path: str, fields: list[tuple[str, str]]) -> None:
    lines = ["Host: a.test", *(f"{n}: {v}" for n, v in fields)]
    h = parse(*lines, request_line=f"{method} /{path} HTTP/1.1")
    assert h.method == method
    assert h.target == f"/{path}".encode()
    assert h.fields == [("Host", "a.test"), *fields]


# --- chunked decoding ---------------------------------------------------------------------------


def decode_all(decoder: ChunkedDecoder, pieces: list[bytes]) -> tuple[bytes, bytes]:
    body: list[bytes] = []
    rest = b""
    for piece in pieces:
        out, tail = decoder.feed(piece)
        body += out
        if decoder.done:
            rest += tail
        else:
            assert tail == b""
    return b"".join(body), rest


def test_chunked_fed_byte_by_byte_with_extensions_and_trailers() -> None:
    wire = (
        b"5;name=value\r\nhello\r\n"
        b'1;a;b="quoted; \\" ext"\r\n \r\n'
        b"A \t;x=1\r\n0123456789\r\n"
        b"00000;last\r\n"
        b"Trailer-One: 1\r\nTrailer-Two: two\r\n\r\n"
        b"GET /next HTTP/1.1\r\n"
    )
    d = ChunkedDecoder()
    body, rest = decode_all(d, [wire[i : i + 1] for i in range(len(wire))])
    assert d.done
    assert body == b"hello 0123456789"
    assert rest == b"GET /next HTTP/1.1\r\n"


def test_chunked_in_one_piece_returns_bytes_past_the_end() -> None:
    d = ChunkedDecoder()
    out, rest = d.feed(b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert out == [b"abc"] and d.done and rest == b"GET / HTTP/1.1\r\n\r\n"


def test_chunked_feed_after_done_returns_everything() -> None:
    d = ChunkedDecoder()
    d.feed(b"0\r\n\r\n")
    assert d.feed(b"more") == ([], b"more")


def test_chunked_uppercase_hex_and_large_size() -> None:
    d = ChunkedDecoder()
    data = b"x" * 0x1FF
    body, rest = decode_all(d, [b"1Ff\r\n" + data + b"\r\n0\r\n\r\n"])
    assert body == data and rest == b"" and d.done


@pytest.mark.parametrize(
    "wire",
    [
        b"z\r\n",
        b"\r\n",
        b"-1\r\n",
        b"+1\r\nx\r\n",
        b"0x1\r\nx\r\n",
        b" 1\r\nx\r\n",  # leading whitespace is not BWS (RFC 9112 7.1.1)
        b"1 1\r\nx\r\n",
        b"11111111111111111\r\n",  # more than 64 bits
        b"3\r\nabcX\r\n",  # data not followed by CRLF
        b"3\r\nabc\n0\r\n\r\n",
        b"1;ext\nfoo\r\nx\r\n0\r\n\r\n",  # bare LF in an extension: a smuggling vector
        b"1;ext\rfoo\r\nx\r\n0\r\n\r\n",
        b"1\nx\r\n0\r\n\r\n",
        b"0\r\nX: a\nb\r\n\r\n",  # bare LF in a trailer
    ],
)
def test_malformed_chunked_is_400(wire: bytes) -> None:
    for pieces in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        d = ChunkedDecoder()
        with pytest.raises(BadRequest) as info:
            decode_all(d, pieces)
        assert info.value.status == 400


def test_chunk_line_too_long_is_400_even_when_complete() -> None:
    for extension in (b"a" * (MAX_CHUNK_LINE + 10), b"a" * (10 * MAX_CHUNK_LINE)):
        wire = b"1;" + extension + b"\r\nx\r\n0\r\n\r\n"
        with pytest.raises(BadRequest):
            ChunkedDecoder().feed(wire)
        # and arriving slowly, without its CRLF yet
        with pytest.raises(BadRequest):
            decode_all(ChunkedDecoder(), [wire[i : i + 1000] for i in range(0, len(wire), 1000)])


def test_unbounded_trailer_section_is_400() -> None:
    d = ChunkedDecoder()
    d.feed(b"0\r\n")
    with pytest.raises(BadRequest):
        for _ in range(10_000):
            d.feed(b"X-Trailer: " + b"t" * 100 + b"\r\n")


@st.composite
def chunked_encodings(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(body, wire): any chunking of any body, with random extensions and trailers."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=8))
    ext = st.sampled_from([b"", b";a", b";a=b", b' ;a="x;y"', b"\t;k=v;k2", b";" + b"e" * 50])
    wire = b""
    for chunk in chunks:
        size = f"{len(chunk):x}".encode()
        if draw(st.booleans()):
            size = size.upper()
        if draw(st.booleans()):
            size = b"0" * draw(st.integers(0, 3)) + size
        wire += size + draw(ext) + b"\r\n" + chunk + b"\r\n"
    wire += b"0" + draw(ext) + b"\r\n"
    for name, value in draw(
        st.lists(
            st.tuples(
                st.sampled_from([b"X-T", b"Etag"]),
                st.binary(min_size=0, max_size=10).filter(
                    lambda v: b"\r" not in v and b"\n" not in v
                ),
            ),
            max_size=3,
        )
    ):
        wire += name + b": " + value + b"\r\n"
    wire += b"\r\n"
    return b"".join(chunks), wire


@settings(max_examples=400, deadline=None)
@given(chunked_encodings(), st.binary(max_size=20), st.data())
def test_chunked_decoder_output_equals_input_for_any_split(
    encoded: tuple[bytes, bytes], after: bytes, data: st.DataObject
) -> None:
    body, wire = encoded
    stream = wire + after
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    d = ChunkedDecoder()
    got, rest = decode_all(d, pieces)
    assert d.done
    assert got == body
    assert rest == after
