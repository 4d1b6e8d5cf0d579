"""Identifiers that cross a party boundary (model, epoch, job, bundle, tenant), checked against one
pattern at the message boundary: they end up in file paths, topics and SQL, so ``../x``, ``a/b``,
``+``, ``#`` and empty names never get in.

A *deployment* of a model is ``(model, epoch)``: the epoch is a fresh random id per ``deploy``, and
masks, bundles, jobs and deploy labels all carry it, so nothing made for one deployment is ever used
with another (:func:`key` names one in stores and dealer state).
"""

from __future__ import annotations

import re
import secrets

from .errors import UsageError

PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
ID_FIELDS = ("model", "epoch", "job", "id", "bundle", "tenant")


def check(kind: str, value: str) -> str:
    """``value`` if it is a valid id, else UsageError naming the field."""
    if not isinstance(value, str) or PATTERN.fullmatch(value) is None:
        shown = value[:40] if isinstance(value, str) else type(value).__name__
        raise UsageError(f"{kind} id {shown!r} is not valid: 1-64 letters, digits, '-' or '_', starting with a "
                         "letter or digit")
    return value


def new_epoch() -> str:
    return secrets.token_hex(8)


def key(model: str, epoch: str) -> str:
    """The name of one deployment (``model@epoch``) in stores and dealer state."""
    return f"{check('model', model)}@{check('epoch', epoch)}"


def split(k: str) -> tuple[str, str]:
    model, _, epoch = k.partition("@")
    return check("model", model), check("epoch", epoch)
