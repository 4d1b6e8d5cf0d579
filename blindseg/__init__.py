"""blindseg: two-server secure U-Net segmentation over Z_2^32 with a dealer.

Modules in dependency order: ``errors``, ``prg``, ``ring``, ``bits``,
``linalg`` (exact ring kernels), ``circuit`` (borrow circuit), ``plan``
(compiler, calibration, fixed-point reference), ``preprocessing`` (what each op
consumes), ``protocols`` (pure secure layers), ``wire`` (frames), ``channel``
(the I/O boundary), ``server`` (server core + round driver), ``engine``
(in-process run of all roles), ``models``, ``bench``, ``cli``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["secure_segment", "SegmentResult", "__version__"]
__version__ = "0.1.0"  # as in pyproject.toml (tests/test_structure.py checks they agree)


def __getattr__(name: str) -> Any:  # lazy: importing blindseg does not import torch or numba
    if name in ("secure_segment", "SegmentResult", "secure_segment_async"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
