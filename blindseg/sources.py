"""Material sources: where a server's bundles come from, behind one interface (the server side).

A :class:`MaterialSource` hands a server, for one bundle, its announcement and then the op frames
server 1 needs (server 0 needs none). Two sources, one test suite (``tests/test_dealer.py``):

- :class:`dealer.provider.LocalSource`: an in-process dealer generates each op on demand;
- :class:`RemoteSource`: the frames the dealer service sent over a link (``bundle:<id>:<op>``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from blindseg.channel import Endpoint
from blindseg.messages import BundleAnnounce, BundleOp, expect


class MaterialSource(ABC):
    """One bundle's frames for one server."""

    announce: BundleAnnounce

    @abstractmethod
    async def op(self, i: int, timeout: float | None) -> tuple[BundleOp, int]:
        """Op ``i``'s corrections and the bytes they took on the way here."""


class RemoteSource(MaterialSource):
    """Frames from the dealer service, received on the link to the dealer."""

    def __init__(self, announce: BundleAnnounce, dealer: Endpoint) -> None:
        self.announce, self.dealer = announce, dealer

    async def op(self, i: int, timeout: float | None) -> tuple[BundleOp, int]:
        label = f"bundle:{self.announce.id}:{i}"
        frame = await self.dealer.recv(label, timeout)
        return expect(frame, BundleOp), self.dealer.wire_size(label, frame)
