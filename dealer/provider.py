"""The in-process material source: a :class:`~dealer.core.Dealer` in this process (tests, tools)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from blindseg.errors import UsageError
from blindseg.messages import BundleOp
from blindseg.sources import MaterialSource

from .core import Bundle, Dealer


class LocalSource(MaterialSource):
    """An in-process dealer: each op's corrections are generated when the server asks for them."""

    def __init__(self, bundle: Bundle, ops: Iterator[BundleOp] | None) -> None:
        self.announce, self._ops = bundle.announce(), ops

    @staticmethod
    def pair(dealer: Dealer, model: str, batch: int) -> tuple[LocalSource, LocalSource]:
        """Sources for server 0 and server 1 of one fresh bundle."""
        b0, b1 = dealer.new_bundle(model, batch)
        return LocalSource(b0, None), LocalSource(b1, dealer.corrections(b0, b1))

    async def op(self, i: int, timeout: float | None) -> tuple[BundleOp, int]:
        if self._ops is None:
            raise UsageError("server 0 receives no corrections")
        msg = await asyncio.to_thread(next, self._ops)
        return msg, 0
