# The C line maker (edge/_logline.c); edge.accesslog.LineFormatter is its one user.
from collections.abc import Callable

from edge.accesslog import Exchanged, Line
from edge.http1 import RequestHead

class LineMaker:
    def __init__(
        self,
        edge: str,
        unknown_domain: str,
        content_types: dict[bytes, str | None],
        fallback: Callable[[float, float, Exchanged], Line],
        head_type: type[RequestHead],
    ) -> None: ...
    def format(self, end: float, end_mono: float, exchange: Exchanged, /) -> Line: ...
