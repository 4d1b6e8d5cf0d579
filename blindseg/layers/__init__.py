"""The layer registry: every secure layer kind, one object each, looked up by op kind.

=========== ===================== =========================================================
kind        module                what it is
=========== ===================== =========================================================
input       :mod:`.local`         the image share at scale f
conv, convt :mod:`.linear`        exact ring (transposed) conv, Beaver with fixed model masks
rescale     :mod:`.rescale`       truncation, optionally fused with ReLU / LeakyReLU
norm        :mod:`.norm`          instance / group normalisation (secure mean, variance, rsqrt)
sigmoid     :mod:`.gate`          sigmoid inside the network (piecewise linear by ReLUs)
mul         :mod:`.gate`          product of two activations (attention gates)
maxpool     :mod:`.pool`          tournament of comparisons
avgsum      :mod:`.local`         window sum (the next rescale divides)
concat, add :mod:`.local`         channel concat / elementwise add
upsample    :mod:`.local`         nearest-neighbour, integer factor
interp      :mod:`.local`         (bi/tri)linear upsampling by 2/4/8 (public dyadic weights; next rescale)
argmax      :mod:`.argmax`        label per voxel (mask output)
output      :mod:`.local`         logits to the data owner
=========== ===================== =========================================================

The plan walk, the dealer, the layout and the reference interpreters loop over this table; no
other module dispatches on an op's kind. Adding a layer: README, "Adding a layer".
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ..errors import UsageError
from .argmax import Argmax, ArgmaxParams
from .base import Calibration, DealContext, Layer, LocalLayer, NoParams, OpMaterial, Params, Runtime, windows
from .gate import Mul, Sigmoid, SigmoidParams
from .linear import Linear, LinearParams, ModelShare
from .local import Add, AvgSum, Concat, Input, Interp, InterpParams, Output, Upsample, UpsampleParams
from .norm import Norm, NormParams
from .pool import MaxPool, MaxPoolParams, PoolParams
from .rescale import Rescale, RescaleParams

REGISTRY: Mapping[str, Layer] = MappingProxyType({layer.kind: layer for layer in (
    Input(), Linear("conv", transposed=False), Linear("convt", transposed=True), Rescale(), Norm(), Sigmoid(), Mul(), MaxPool(), AvgSum(),
    Concat(), Add(), Upsample(), Interp(), Argmax(), Output(),
)})


def layer_of(kind: str) -> Layer:
    """The registered layer for an op kind; a UsageError naming the known kinds otherwise."""
    try:
        return REGISTRY[kind]
    except KeyError:
        raise UsageError(f"unknown op kind {kind!r}; known: {', '.join(REGISTRY)}") from None


__all__ = ["REGISTRY", "Argmax", "ArgmaxParams", "Calibration", "DealContext", "Layer", "Linear", "LinearParams",
           "LocalLayer", "ModelShare", "NoParams", "Norm", "NormParams", "OpMaterial", "Params", "MaxPoolParams", "PoolParams", "Rescale", "RescaleParams",
           "Runtime", "SigmoidParams", "Upsample", "UpsampleParams", "InterpParams", "layer_of", "windows"]
