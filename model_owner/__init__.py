"""The model owner: compiles a trained model into a public plan and secret-shares its weights.

Owns the weights (never sent in the clear) and the plan's public metadata
(architecture, shapes, scales, preprocessing, class names). Calibration runs
on the model owner's own sample inputs.
"""

from __future__ import annotations

import numpy as np

from blindseg.compiler import compile_model
from blindseg.plan import Compiled, encode_weights
from blindseg.prg import Prg, new_seed

__all__ = ["compile_model", "share_weights"]

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
