"""Deployed models on a server's disk: ``models/<id>.npz`` (E, B_i + i*E, bias share per weighted op)
and ``models/<id>.plan.json`` (the public plan). Written atomically (temp file, then rename)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from blindseg.layers import ModelShare
from blindseg.plan import Plan

from .core import ServerCore


def _dir(state_dir: Path) -> Path:
    d = state_dir / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_model(state_dir: Path, model: str, core: ServerCore) -> None:
    d = _dir(state_dir)
    arrays: dict[str, np.ndarray] = {}
    for i, st in core.model.items():
        arrays[f"e{i}"], arrays[f"w{i}"] = st.e, st.w_online
        if st.bias is not None:
            arrays[f"b{i}"] = st.bias
    tmp = d / f"{model}.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    (d / f"{model}.plan.json").write_text(json.dumps(core.plan.to_dict()))
    tmp.replace(d / f"{model}.npz")


def load_models(state_dir: Path, party: int) -> dict[str, ServerCore]:
    out = {}
    for npz in sorted(_dir(state_dir).glob("*.npz")):
        model = npz.name[:-4]
        plan = Plan.from_dict(json.loads((npz.parent / f"{model}.plan.json").read_text()))
        core = ServerCore(party, plan)
        with np.load(npz) as z:
            for i in plan.weighted_ops():
                core.model[i] = ModelShare(z[f"e{i}"], z[f"w{i}"], z[f"b{i}"] if f"b{i}" in z else None)
        out[model] = core
    return out
