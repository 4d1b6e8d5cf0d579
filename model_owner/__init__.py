"""The model owner: compiles a trained model into a public plan and secret-shares its weights.

Owns the weights (never sent in the clear) and the plan's public metadata
(architecture, shapes, scales, preprocessing, class names). Calibration runs
on the model owner's own sample inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from blindseg.plan import Compiled, compile_model, encode_weights
from blindseg.prg import Prg, new_seed
from blindseg.wire import encode_frame

__all__ = ["compile_model", "share_weights", "weights_frame"]

WeightShares = dict[int, tuple[np.ndarray, np.ndarray | None]]


def share_weights(comp: Compiled, seed: bytes | None = None) -> tuple[WeightShares, WeightShares]:
    """Fixed-point encode the weights and split them additively: (server0's, server1's)."""
    prg = Prg(seed or new_seed())
    s0: WeightShares = {}
    s1: WeightShares = {}
    for i, (w, b) in encode_weights(comp).items():
        w0 = prg.uint32(w.shape)
        b0 = prg.uint32(b.shape) if b is not None else None
        s0[i] = (w0, b0)
        s1[i] = (w - w0, b - b0 if b is not None and b0 is not None else None)
    return s0, s1


def weights_frame(model_id: str, shares: WeightShares) -> bytes:
    """One server's weight shares as a frame (op indices and bias presence in the header)."""
    ops = sorted(shares)
    arrays: list[np.ndarray] = []
    has_bias = []
    for i in ops:
        w, b = shares[i]
        arrays.append(w)
        has_bias.append(b is not None)
        if b is not None:
            arrays.append(b)
    header: dict[str, Any] = {"t": "weights", "model": model_id, "ops": ops, "bias": has_bias}
    return encode_frame(header, arrays)
