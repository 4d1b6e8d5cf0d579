"""Background tasks whose failures are reported, never lost: an expected failure (a BlindsegError,
e.g. a progress message to a peer that just went away) is one warning line; anything else is a bug,
logged with its traceback. Without this asyncio prints "Task exception was never retrieved"."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from .errors import BlindsegError


def spawn(tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any], log: logging.Logger,
          what: str) -> asyncio.Task[Any]:
    """Run ``coro`` in the background, kept in ``tasks`` until it ends (so it can be cancelled)."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        tasks.discard(t)
        if t.cancelled():
            return
        e = t.exception()
        if isinstance(e, BlindsegError):
            log.warning("%s: %s", what, e)
        elif e is not None:
            log.error("%s failed", what, exc_info=e)

    task.add_done_callback(done)
    return task
