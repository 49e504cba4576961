"""What the test services share: ``start()`` returns the started service, ``stop()`` ends it, ``with`` does both."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class StartStop:
    """Base of a service with ``start``/``stop``; subclasses define both."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
