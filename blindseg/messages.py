"""Every message between parties, as frozen dataclasses; the only caller of the frame encoder.

``msg.encode()`` -> frame bytes (:mod:`blindseg.wire`); :func:`decode` / :func:`expect` parse a
received frame into its type, validating every field: a frame that does not fit raises
:class:`~blindseg.errors.ProtocolError` (the peer misbehaved), while building a message with wrong
field types raises :class:`~blindseg.errors.UsageError` (the caller misused it).

Control messages travel on ``ctl:<T>`` labels (the role's service loop receives them); the others on
deterministic labels (``<job>:<op>:<round>``, ``bundle:<id>:<op>``, ``<job>:bundle:<k>`` ...).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from . import ids
from .errors import ProtocolError, UsageError
from .wire import decode_frame, encode_frame

M = TypeVar("M", bound="Message")
_NO_ARRAYS: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class Message:
    """Base: ``T`` is the type tag on the wire; ``arrays`` (if the type has them) follow the header."""

    T: ClassVar[str] = ""
    ARRAYS: ClassVar[tuple[int, int]] = (0, 0)  # how many arrays the type carries: (min, max)

    def __post_init__(self) -> None:
        for name, typ in _fields(type(self)).items():
            v = getattr(self, name)
            if name != "arrays" and not _fits(v, typ):
                raise UsageError(f"{type(self).__name__}.{name} must be {typ}, got {type(v).__name__}")
            if name in ids.ID_FIELDS and v is not None and (v or name not in _optional(type(self))):
                ids.check(name, v)  # empty only where the field is optional (default "")
        lo, hi = self.ARRAYS
        if not lo <= len(self.payload) <= hi:
            raise UsageError(f"{type(self).__name__} carries {lo}..{hi} arrays, got {len(self.payload)}")

    @property
    def payload(self) -> tuple[np.ndarray, ...]:
        return tuple(getattr(self, "arrays", _NO_ARRAYS))

    def header(self) -> dict[str, Any]:
        return {"t": self.T, **{n: getattr(self, n) for n in _fields(type(self)) if n != "arrays"}}

    def encode(self) -> bytes:
        return encode_frame(self.header(), list(self.payload))

    def __repr__(self) -> str:  # never print seeds or share values
        shown = {n: getattr(self, n) for n in _fields(type(self)) if n not in ("arrays", "seed")}
        return f"{type(self).__name__}({shown}, arrays={[a.shape for a in self.payload]})"


def _fields(cls: type[Message]) -> dict[str, str]:
    hints = cls.__dict__.get("_hints")
    if hints is None:
        hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        cls._hints = hints  # type: ignore[attr-defined]
    return hints  # type: ignore[no-any-return]


def _optional(cls: type[Message]) -> frozenset[str]:
    opt = cls.__dict__.get("_optional")
    if opt is None:
        opt = frozenset(f.name for f in dataclasses.fields(cls) if f.default == "")
        cls._optional = opt  # type: ignore[attr-defined]
    return opt  # type: ignore[no-any-return]


_PLAIN: dict[str, type] = {"str": str, "bool": bool, "bytes": bytes}


def _fits(v: Any, typ: str) -> bool:
    if typ.endswith(" | None"):
        return v is None or _fits(v, typ[: -len(" | None")])
    if typ == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if typ == "float":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if typ in _PLAIN:
        return isinstance(v, _PLAIN[typ])
    if typ.startswith("dict"):
        return isinstance(v, dict)
    if typ.startswith("list"):
        return isinstance(v, list)
    return False


@functools.lru_cache(maxsize=1)
def _types() -> dict[str, type[Message]]:
    """Every message type by its tag (the subclasses of :class:`Message`)."""
    out: dict[str, type[Message]] = {}
    todo = list(Message.__subclasses__())
    while todo:
        cls = todo.pop()
        out[cls.T] = cls
        todo += cls.__subclasses__()
    return out


def decode(frame: bytes | memoryview, copy: bool = True) -> Message:
    """Parse a frame into its message type (ProtocolError naming what is wrong); ``copy=False``: its
    arrays are views of ``frame``."""
    header, arrays = decode_frame(frame, copy=copy)
    cls = _types().get(str(header.pop("t", "")))
    if cls is None:
        raise ProtocolError("frame has an unknown message type")
    kwargs: dict[str, Any] = {}
    missing = []
    for f in dataclasses.fields(cls):
        if f.name == "arrays":
            kwargs["arrays"] = tuple(arrays)
        elif f.name in header:
            kwargs[f.name] = header.pop(f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(f.name)
    if missing or header:
        raise ProtocolError(f"{cls.T} message has missing fields {missing} or unknown ones {sorted(header)}")
    if arrays and "arrays" not in kwargs:
        raise ProtocolError(f"{cls.T} message carries arrays it must not")
    try:
        return cls(**kwargs)
    except UsageError as e:
        raise ProtocolError(f"malformed {cls.T} message: {e}") from None


def expect(frame: bytes | memoryview, cls: type[M], copy: bool = True) -> M:
    """Decode a frame that must be of type ``cls``."""
    msg = decode(frame, copy)
    if not isinstance(msg, cls):
        raise ProtocolError(f"expected a {cls.T} message, got {msg.T}")
    return msg


# -------------------------------------------------------------- deployment


@dataclass(frozen=True, repr=False)
class PlanMsg(Message):
    """model_owner -> dealer: the public plan of a new model."""

    T = "plan"
    model: str
    epoch: str
    plan: dict[str, Any]


@dataclass(frozen=True, repr=False)
class Deploy(Message):
    """model_owner -> server: plan + this server's weight shares (per op: weight, then bias if ``bias``)."""

    T = "deploy"
    ARRAYS = (0, 4096)
    model: str
    epoch: str
    tenants: list[str]
    plan: dict[str, Any]
    ops: list[int]
    bias: list[bool]
    arrays: tuple[np.ndarray, ...] = ()

    def weights(self) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
        """The weight shares per op (ProtocolError if the arrays do not match the header)."""
        if len(self.ops) != len(self.bias) or len(self.arrays) != len(self.ops) + sum(map(bool, self.bias)):
            raise ProtocolError("deploy message: arrays do not match its op list")
        out: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        k = 0
        for i, hb in zip(self.ops, self.bias, strict=True):
            out[int(i)] = (self.arrays[k], self.arrays[k + 1] if hb else None)
            k += 2 if hb else 1
        return out

    @staticmethod
    def of(model: str, epoch: str, tenants: list[str], plan: dict[str, Any],
           shares: dict[int, tuple[np.ndarray, np.ndarray | None]]) -> Deploy:
        ops = sorted(shares)
        arrays: list[np.ndarray] = []
        for j in ops:
            w, b = shares[j]
            arrays += [w] if b is None else [w, b]
        return Deploy(model, epoch, tenants, plan, ops, [shares[j][1] is not None for j in ops], tuple(arrays))


@dataclass(frozen=True, repr=False)
class Masks(Message):
    """dealer -> server: the seed of this server's model-mask shares B_i."""

    T = "masks"
    model: str
    epoch: str
    seed: bytes = field(repr=False)


@dataclass(frozen=True, repr=False)
class Deployed(Message):
    """server -> model_owner: E opened, the deployment is staged (it serves once committed)."""

    T = "deployed"
    model: str
    epoch: str
    party: str


@dataclass(frozen=True, repr=False)
class Commit(Message):
    """model_owner -> servers and dealer: switch ``model`` to ``epoch`` (all staged), purge the old one."""

    T = "commit"
    model: str
    epoch: str


@dataclass(frozen=True, repr=False)
class Committed(Message):
    """server / dealer -> model_owner: ``model`` now serves ``epoch``."""

    T = "committed"
    model: str
    epoch: str
    party: str


# ----------------------------------------------------------------- offline


@dataclass(frozen=True, repr=False)
class BundleAnnounce(Message):
    """dealer -> server: a bundle (this server's seed; server 1's corrections follow per op)."""

    T = "bundle"
    id: str
    model: str
    epoch: str
    batch: int
    party: int
    seed: bytes
    layout: str = ""  # digest of the layout the dealer generated for


@dataclass(frozen=True, repr=False)
class BundleOp(Message):
    """dealer -> server1: the corrections of one op of a bundle (label ``bundle:<id>:<op>``)."""

    T = "bundle-op"
    ARRAYS = (1, 4096)
    id: str
    op: int
    arrays: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True, repr=False)
class PoolRequest(Message):
    """server0 -> dealer: a bundle was used (``T = used``) or a job waits for one (``need``)."""

    T = "used"
    model: str
    epoch: str
    batch: int
    ready: int = 0


@dataclass(frozen=True, repr=False)
class Need(PoolRequest):
    T = "need"


# ------------------------------------------------------------------ online


@dataclass(frozen=True, repr=False)
class GetPlan(Message):
    T = "getplan"
    model: str


@dataclass(frozen=True, repr=False)
class PlanInfo(Message):
    T = "planinfo"
    model: str
    epoch: str
    plan: dict[str, Any]


@dataclass(frozen=True, repr=False)
class Job(Message):
    """data_owner -> server: a job and this server's input share."""

    T = "job"
    ARRAYS = (1, 1)
    job: str
    model: str
    epoch: str
    batch: int
    arrays: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True, repr=False)
class Offer(Message):
    """data owner -> the server pairs' server0s, through the broker's shared subscription (one of them
    gets it): who takes this job? Sealed for each server0 on its own (:mod:`blindseg.transport`);
    ``sent``: the data owner's clock (Unix seconds), so a replayed old offer is dropped."""

    T = "offer"
    job: str
    model: str
    epoch: str
    batch: int
    sent: float


@dataclass(frozen=True, repr=False)
class Claim(Message):
    """server0 of a pair -> data owner (``ctl:claim``): this pair takes the job; the data owner sends
    its shares to this pair's two servers only (the job is pinned to it)."""

    T = "claim"
    job: str


@dataclass(frozen=True, repr=False)
class Progress(Message):
    """server0 -> data owner: ``phase`` ("bundle": waiting for a bundle from the dealer; "online": op
    ``op`` of ``ops`` done)."""

    T = "progress"
    job: str
    op: int
    ops: int
    phase: str = "online"


@dataclass(frozen=True, repr=False)
class Error(Message):
    """any -> requester: a job or request failed, with the reason."""

    T = "error"
    error: str
    party: str
    job: str | None = None
    model: str | None = None
    code: str = ""  # "epoch": the model was redeployed (ask for the plan again); "" otherwise


@dataclass(frozen=True, repr=False)
class Output(Message):
    """server -> data_owner (label ``<job>:output``): the output share and the job's costs at that server.
    ``ops``: per op [index, seconds, bytes, rounds]; ``log``: per frame to the peer [label, bytes];
    ``wait_seconds``: from the job's arrival to its first round (bundle agreement, waiting for the dealer);
    ``run_seconds``: its rounds, of which ``compute_seconds`` in this server's own protocol steps."""

    T = "output"
    ARRAYS = (1, 1)
    job: str
    rounds: int
    bytes: int
    offline_bytes: int = 0
    offline_seconds: float = 0.0
    wait_seconds: float = 0.0
    ops: list[Any] = field(default_factory=list)
    log: list[Any] = field(default_factory=list)
    arrays: tuple[np.ndarray, ...] = ()
    run_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass(frozen=True, repr=False)
class Use(Message):
    """server0 -> server1 (``<job>:bundle:<k>``): use this bundle, or the job is aborted (``abort``)."""

    T = "use"
    bundle: str = ""
    abort: str = ""
    tenant: str = ""  # who asked for the job at server0 (server1 must have it from the same one)
    burnt: list[str] = field(default_factory=list)  # bundles server0 burnt lately: server1 drops its copies


@dataclass(frozen=True, repr=False)
class Ack(Message):
    """server1 -> server0 (``<job>:ack:<k>``): the bundle is consumed (``ok``) or why it cannot be;
    then ``known``: the bundles of that deployment and batch server1 holds (ready or arriving)."""

    T = "ack"
    ok: bool
    why: str = ""
    known: list[str] = field(default_factory=list)


@dataclass(frozen=True, repr=False)
class Shares(Message):
    """server -> server (``<job>:<op>:<round>``): this server's shares of one round's openings."""

    T = "open"
    ARRAYS = (0, 4096)
    l: str  # noqa: E741 - the label, as on the wire
    na: int
    arrays: tuple[np.ndarray, ...] = ()


