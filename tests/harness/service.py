"""A program the tests start and stop, usable as a context manager."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """``with Service(...) as started:`` runs ``start()``, then ``stop()`` on the way out."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
