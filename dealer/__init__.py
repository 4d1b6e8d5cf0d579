"""The dealer: correlated randomness, never data.

It holds, per deployed model, the two seeds of the model-share masks B
(server i expands B_i itself), and per job two bundle seeds; it computes every
*derived* item (each layer's :meth:`~blindseg.layers.Layer.derive`) from the values of the random
items and sends server 1 only ``value - share0`` (XOR for bits). Server 0's
bundle is its seed alone. Cost per bundle: one ring conv per linear layer
(C = f(A, B)) plus elementwise work; offline bytes = the corrections.
"""

from __future__ import annotations

from .core import Bundle, Dealer

__all__ = ["Bundle", "Dealer"]
