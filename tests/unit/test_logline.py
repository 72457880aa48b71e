"""edge._logline, the C line maker: the same bytes as the Python path for every exchange, the
Python path only for what C does not make, and nothing kept or leaked."""

from __future__ import annotations

import gc
import os
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.accesslog import COMPILED, Ended, Exchanged, Line, LineFormatter, parse_line
from edge.http1 import RequestHead, parse_head
from edge.server import Exchange

UNKNOWN = "-"
T = 1_795_698_301.123456  # 2026-11-26T13:05:01.123 UTC

needs_c = pytest.mark.skipif(
    not COMPILED, reason="edge/_logline.c is not built (no C compiler at install)"
)


def test_the_c_line_maker_is_built_where_ci_runs() -> None:
    """CI installs with a compiler: an install that silently lost the C maker fails here."""
    if os.environ.get("CI") != "true" and not COMPILED:
        pytest.skip("edge/_logline.c is not built here (no C compiler at install)")
    assert COMPILED
    assert LineFormatter("e1", UNKNOWN).compiled


class CountingFormatter(LineFormatter):
    """Counts the lines handed to the Python path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.in_python = 0
        super().__init__(*args, **kwargs)

    def format_in_python(self, end: float, end_mono: float, ex: Exchanged) -> Line:
        self.in_python += 1
        return super().format_in_python(end, end_mono, ex)


def exchange(head: RequestHead, **values: object) -> Exchange:
    """A real exchange (edge.server) of `head`, its values set as the data path sets them."""
    ex = Exchange(SimpleNamespace(peer="192.0.2.7"), head)  # type: ignore[arg-type]
    ex.started = 100.0
    ex.domain = "www.example.com"
    ex.outcome = "hit"
    ex.status, ex.bytes_sent, ex.body_bytes_sent = 200, 300, 100
    ex.head_at = 100.25
    ex.response_head = b"Content-Length: 100\r\nContent-Type: text/html\r\n"
    for name, value in values.items():
        setattr(ex, name, value)
    return ex


ORDINARY = parse_head(
    b"GET /img/a.png?v=2 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: wrk\r\n"
    b"Referer: http://r.example/\r\nRange: bytes=0-99\r\n\r\n"
)


@needs_c
def test_ordinary_lines_are_made_in_c_and_the_rest_in_python() -> None:
    fmt = CountingFormatter("e1", UNKNOWN)
    python = LineFormatter("e1", UNKNOWN, compiled=False)
    ordinary = exchange(ORDINARY)
    first = fmt.format(T, 100.5, ordinary)
    assert fmt.in_python == 1  # a Content-Type not seen yet: Python finds and remembers it
    for i in range(100):
        end = T + i * 0.0004
        assert fmt.format(end, 100.5, ordinary) == python.format(end, 100.5, ordinary)
    assert fmt.in_python == 1
    assert first == python.format(T, 100.5, ordinary)
    assert parse_line(first[2]).user_agent == b"wrk"

    non_ascii = parse_head(b"GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: caf\xc3\xa9\r\n\r\n")
    others: list[Exchanged] = [
        exchange(ORDINARY, domain=UNKNOWN),  # unrouted: the `_` files, the Host as the domain
        exchange(non_ascii),
        exchange(ORDINARY, response_head=b"Content-Type: a/\xff\r\n"),
        Ended(100.0, 0.0, "192.0.2.7", UNKNOWN, b"BAD\x00", 400, 10, 0, "refused", b"", None,
              None),
    ]  # fmt: skip
    for n, ex in enumerate(others, start=2):
        assert fmt.format(T, 100.5, ex) == python.format(T, 100.5, ex)
        assert fmt.in_python == n


@needs_c
def test_the_hour_follows_the_clock_wherever_it_jumps() -> None:
    c, python = LineFormatter("e1", UNKNOWN), LineFormatter("e1", UNKNOWN, compiled=False)
    ex = exchange(ORDINARY)
    for end in (T, 0.0, 0.5, 3599.9995, 3600.0, T, T + 3600.0, 1.0):
        assert c.format(end, 100.5, ex) == python.format(end, 100.5, ex)


@needs_c
def test_formatting_keeps_no_reference_to_what_it_read() -> None:
    fmt = LineFormatter("e1", UNKNOWN)
    ex = exchange(ORDINARY, origin_status=200, origin_ms=12.5)
    fmt.format(T, 100.5, ex)  # the Content-Type remembered; the layouts learned
    values = [ex, ex.head, ex.client_ip, ex.response_head, ORDINARY.headers["user-agent"]]
    before = [sys.getrefcount(v) for v in values]
    for i in range(10_000):
        fmt.format(T + i, 100.5, ex)
    assert [sys.getrefcount(v) for v in values] == before


# --- the same bytes as the Python path -----------------------------------------------------

_ascii = st.binary(max_size=40).map(lambda b: bytes(c & 0x7F for c in b))
_any_bytes = st.one_of(_ascii, st.binary(max_size=20))  # mostly ASCII, sometimes any byte
_durations = st.one_of(st.floats(min_value=0.0, max_value=2.0), st.just(0.0))
_odd_durations = st.one_of(
    st.floats(min_value=-1.0, max_value=0.0),  # a clock that went back: negative
    st.floats(min_value=1e9, max_value=1e13),  # 1e15 µs and more
)
_counts = st.integers(0, 10**12)
_odd_counts = st.one_of(st.integers(-5, 2**70), st.just(True))  # past 64 bits; a bool
_ends = st.one_of(
    st.floats(min_value=1_795_690_000.0, max_value=1_795_710_000.0),  # hours around T
    st.sampled_from([1_795_701_600.0, 1_795_701_599.9995]),  # the boundary of 14:00
)
_odd_ends = st.one_of(st.sampled_from([0.0, -1.5, 3e11]), st.integers(1_795_690_000, 2 * 10**9))
_content_types = [b"", b"Content-Type: text/html\r\n", b'content-type: a/"b\\\r\n',
                  b"Content-Length: 1\r\n"]  # fmt: skip
_odd_content_types = [b"Content-Type: caf\xc3\xa9\r\n", b"Content-Type: x\xff\r\n"]


@st.composite
def heads(draw: st.DrawFn, ordinary: bool) -> RequestHead | bytes:
    if not ordinary and draw(st.booleans()):
        return draw(st.binary(max_size=30))  # a refused request's raw bytes
    values = _ascii if ordinary else _any_bytes
    method = draw(st.sampled_from(["GET", "HEAD", 'PO"ST', "X\\Y"]))
    target = draw(values) or b"/"
    headers = {
        name: draw(values).decode("latin-1")  # as edge.http1 decodes field values
        for name in ("range", "referer", "user-agent", "host")
        if draw(st.booleans())
    }
    received = draw(st.one_of(st.none(), values))
    ascii_head = (
        target.isascii()
        and all(v.isascii() for v in headers.values())
        and (received is None or received.isascii())
    )
    return RequestHead(
        method=method,
        target=target,
        version=draw(st.sampled_from([10, 11])),
        fields=[],
        headers=headers,
        host=headers.get("host", ""),
        keep_alive=True,
        content_length=0,
        chunked=False,
        expect_continue=False,
        ascii=ascii_head,
        received_target=received,
    )


@st.composite
def ended_exchanges(draw: st.DrawFn) -> tuple[float, float, Exchanged]:
    """Mostly what C makes (an ASCII head, a routed domain, values in range), and one in four
    with something C hands to the Python path."""
    ordinary = draw(st.integers(0, 3)) > 0

    def pick(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> Any:
        return draw(usual if ordinary or draw(st.booleans()) else st.one_of(usual, odd))

    head = draw(heads(ordinary))
    started = draw(st.floats(min_value=0.0, max_value=1e6))
    values: dict[str, Any] = dict(
        started=started,
        head_at=draw(st.one_of(st.just(0.0), st.just(started + pick(_durations, _odd_durations)))),
        client_ip=draw(st.sampled_from(["192.0.2.7", "2001:db8::1", 'x"\\'])),
        domain=pick(st.just("www.example.com"), st.sampled_from([UNKNOWN, "b\u00fccher.ex"])),
        status=pick(st.sampled_from([0, 200, 206, 404]), _odd_counts),
        bytes_sent=pick(_counts, _odd_counts),
        body_bytes_sent=pick(_counts, _odd_counts),
        outcome=draw(st.sampled_from(["hit", "miss", "refused", "error"])),
        response_head=pick(st.sampled_from(_content_types), st.sampled_from(_odd_content_types)),
        origin_status=pick(st.one_of(st.none(), st.integers(100, 599)), _odd_counts),
        origin_ms=None if draw(st.booleans()) else pick(_durations, _odd_durations) * 1e3,
    )
    end = pick(_ends, _odd_ends)
    end_mono = started + pick(_durations, _odd_durations)
    if isinstance(head, bytes) or draw(st.integers(0, 4)) == 0:
        return end, end_mono, Ended(head=head, **values)  # read through getattr, not slots
    return end, end_mono, exchange(head, **values)


def _line_or_error(fmt: LineFormatter, entry: tuple[float, float, Exchanged]) -> object:
    try:
        return fmt.format(*entry)
    except Exception as exc:  # the writer counts such a line lost: both paths must agree
        return type(exc)


@needs_c
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ended_exchanges(), min_size=1, max_size=8))
def test_c_makes_the_python_paths_bytes(entries: list[tuple[float, float, Exchanged]]) -> None:
    """A run of exchanges through one formatter of each kind (their caches of the second, the
    hour and the Content-Types in play): the same directory, hour and line every time."""
    c, python = LineFormatter("edge-1", UNKNOWN), LineFormatter("edge-1", UNKNOWN, compiled=False)
    assert c.compiled and not python.compiled
    for entry in entries:
        assert _line_or_error(c, entry) == _line_or_error(python, entry)
        assert _line_or_error(c, entry) == _line_or_error(python, entry)  # now remembered


# --- callers that break the usual shapes (found in review; each crashed or differed) ---------


def both_ways(end: float, end_mono: float, ex: object) -> tuple[object, object]:
    """(C's result, Python's) for `ex` after an ordinary line (the Content-Type remembered,
    the layouts learned): a line or the exception's type."""
    results = []
    for fmt in (LineFormatter("e1", UNKNOWN), LineFormatter("e1", UNKNOWN, compiled=False)):
        fmt.format(T, 100.5, exchange(ORDINARY))
        results.append(_line_or_error(fmt, (end, end_mono, ex)))  # type: ignore[arg-type]
    return results[0], results[1]


@needs_c
def test_negative_zero_durations_print_as_python_prints_them() -> None:
    c, python = both_ways(T, 100.5, exchange(ORDINARY, origin_ms=-0.0))
    assert c == python and b",-0.0]" in python[2]  # type: ignore[index]
    c, python = both_ways(T, -0.0, exchange(ORDINARY, started=0.0, head_at=0.0))
    assert c == python


@needs_c
def test_a_head_that_is_not_a_request_head_is_pythons_to_refuse() -> None:
    names = ("ascii", "headers", "method", "target", "received_target", "version")
    duck = SimpleNamespace(**{name: getattr(ORDINARY, name) for name in names})
    ex = exchange(ORDINARY)
    ex.head = duck  # type: ignore[assignment]
    c, python = both_ways(T, 100.5, ex)
    assert c is TypeError and python is TypeError


class Slotted:
    __slots__ = (
        *(f"pad{i}" for i in range(64)),
        "started", "head_at", "client_ip", "domain", "head", "status", "bytes_sent",
        "body_bytes_sent", "outcome", "response_head", "origin_status", "origin_ms",
    )  # fmt: skip


@needs_c
def test_slot_descriptors_of_another_class_are_not_read_as_slots() -> None:
    """A class given another class's slot descriptors: getattr refuses them (TypeError); C
    must not read memory at their offsets (it did, past the object's end)."""
    borrowed = type("Borrowed", (), {name: Slotted.__dict__[name] for name in Slotted.__slots__})
    c, python = both_ways(T, 100.5, borrowed())
    assert c is TypeError and python is TypeError


@needs_c
def test_a_class_changed_after_its_first_line_is_read_as_changed() -> None:
    class Patched(Exchange):
        __slots__ = ()

    ex = Patched(SimpleNamespace(peer="192.0.2.7"), ORDINARY)  # type: ignore[arg-type]
    ex.domain, ex.outcome, ex.response_head, ex.started = "www.example.com", "hit", b"", 100.0
    fmt = LineFormatter("e1", UNKNOWN)
    fmt.format(T, 100.5, ex)
    assert parse_line(fmt.format(T, 100.5, ex)[2]).cache == "hit"
    Patched.outcome = property(lambda self: "patched")  # type: ignore[assignment,misc]
    assert parse_line(fmt.format(T, 100.5, ex)[2]).cache == "patched"


@needs_c
def test_values_stay_alive_while_a_header_lookup_runs_python_code() -> None:
    """A header name whose __eq__ runs Python code (here: clearing the Content-Type memo) must
    not leave C holding freed values."""
    fmt = LineFormatter("e1", UNKNOWN)
    armed = False

    class Name(str):
        def __hash__(self) -> int:
            return hash("range")

        def __eq__(self, other: object) -> bool:
            if armed:
                fmt._content_types.clear()
                [f"EVIL{i:05d}" for i in range(50)]  # reuse freed memory, if any
            return False

    head = RequestHead(
        method="GET", target=b"/", version=11, fields=[], headers={Name("x"): "v"}, host="h",
        keep_alive=True, content_length=0, chunked=False, expect_continue=False, ascii=True,
    )  # fmt: skip
    ex = exchange(head, response_head=b"Content-Type: text/html\r\n")
    fmt.format(T, 100.5, ex)
    armed = True
    assert parse_line(fmt.format(T, 100.5, ex)[2]).content_type == b"text/html"


@needs_c
def test_a_line_made_while_another_is_being_made_keeps_both_hours() -> None:
    """A finalizer run by the collector in the middle of a line (allocating its result) that
    makes a line of another hour must not free the first line's hour."""
    fmt = LineFormatter("e1", UNKNOWN)
    ex = exchange(ORDINARY)
    fmt.format(T, 100.5, ex)
    armed = [False]

    class Finalized:
        def __init__(self) -> None:
            self.cycle = self

        def __del__(self) -> None:
            if armed[0]:
                armed[0] = False
                fmt.format(T + 7200, 100.5, ex)
                [f"XXXX-{i:08d}" for i in range(50)]

    fmt.format(T + 3600, 100.5, ex)  # the maker holds "...T14" alone
    gc.disable()
    try:
        drain = [(i, i, i) for i in range(5000)]  # no free 3-tuples: the result allocates
        Finalized()
        armed[0] = True
        gc.set_threshold(1)
        gc.enable()
        _, hour, line = fmt.format(T + 3600, 100.5, ex)
    finally:
        gc.set_threshold(700)
        gc.enable()
    del drain
    assert hour == "2026-11-26T14" and parse_line(line).time.hour == 14


@needs_c
def test_a_line_maker_never_initialised_refuses_to_format() -> None:
    from edge import _logline

    maker = _logline.LineMaker.__new__(_logline.LineMaker)
    with pytest.raises(TypeError, match="not initialised"):
        maker.format(1.0, 1.0, None)  # type: ignore[arg-type]
