"""The small exception hierarchy shared by every role.

- :class:`UsageError`: the caller misused an API or gave bad input (shape, dtype,
  NaN, unsupported layer, unknown model, overflowing scale). Safe to show a user.
- :class:`ProtocolError`: a peer misbehaved (malformed, tampered or unexpected frame).
- :class:`ConnectionLost`: a peer or the broker went away / timed out.
- :class:`PreprocessingExhausted`: no unused dealer bundle is available (or one was
  offered twice). Never answered by generating material inline.

Messages never contain share values, keys or seeds.
"""

from __future__ import annotations


class BlindsegError(Exception):
    """Base class of every error blindseg raises on purpose."""


class UsageError(BlindsegError, ValueError):
    """The caller gave bad input or misused an API."""


class UnsupportedLayerError(UsageError):
    """The model contains an op the secure engine cannot run."""


class ScaleOverflowError(UsageError):
    """The fixed-point scale would overflow the 32-bit ring on the observed ranges."""


class StaleEpoch(UsageError):
    """A job, bundle or mask names a deployment (epoch) of a model that is not the current one."""

    code = "epoch"


class ProtocolError(BlindsegError):
    """A peer sent something the protocol does not allow."""


class UnknownSession(ProtocolError):
    """A sealed message names a session this party does not hold (another run of the peer, or a replay)."""


class ConnectionLost(BlindsegError):
    """A peer or the transport stopped answering."""


class PeerRestarted(ConnectionLost):
    """A peer's new run voided the frames of its old one (its new hello arrived)."""


class StoreFull(BlindsegError):
    """A server's bundle store cannot take more (its disk budget, or the disk itself); it heals when
    jobs consume bundles or space returns."""

    code = "store-full"


class PreprocessingExhausted(BlindsegError):
    """No unused preprocessing bundle is available, or one was requested twice."""
