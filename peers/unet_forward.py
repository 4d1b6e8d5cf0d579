"""The reference U-Net's forward written once over a small op table, for the peers' scripts.

`blindseg bench --peers` saves the model's weights (``state_dict`` as .npz) and the image; each
peer script runs this same forward with its own framework's secure ops, and the plaintext one
with torch/numpy, so every system computes exactly the network blindseg runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Ops = dict[str, Callable[..., Any]]


def stages(weights: dict[str, Any]) -> int:
    return len({k.split(".")[1] for k in weights if k.startswith("down.")})


def forward(x: Any, w: dict[str, Any], op: Ops) -> Any:
    """U-Net: two (3x3 conv + ReLU) per stage, 2x2 max-pool, k2s2 transposed conv, skip concat, 1x1 head.

    ``op`` holds conv(x, w, b, pad), relu, pool, up(x, w, b), cat(a, b)."""

    def block(x: Any, name: str) -> Any:
        for j in (0, 2):
            x = op["relu"](op["conv"](x, w[f"{name}.{j}.weight"], w[f"{name}.{j}.bias"], 1))
        return x

    n = stages(w)
    skips = []
    for i in range(n):
        x = block(x, f"down.{i}")
        skips.append(x)
        x = op["pool"](x)
    x = block(x, "bottom")
    for i in range(n):
        x = op["up"](x, w[f"up.{i}.weight"], w[f"up.{i}.bias"])
        x = block(op["cat"](skips[n - 1 - i], x), f"dec.{i}")
    return op["conv"](x, w["head.weight"], w["head.bias"], 0)
