"""Deployed models on a server's disk, per deployment ``model@epoch``: ``models/<model>@<epoch>.npz``
(E, B_i + i*E, bias share per weighted op) and ``.plan.json`` (the public plan), written when the
deployment is staged; ``models/<model>.current`` names the committed epoch. Every file is 0600 and
written atomically; a commit removes the model's other epochs. Staged deployments that were never
committed are dropped at start (the model owner deploys again)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from blindseg import ids
from blindseg.layers import ModelShare
from blindseg.plan import Plan
from blindseg.state import check_private, private_dir, write_private

from .core import ServerCore


def _dir(state_dir: Path) -> Path:
    return private_dir(state_dir / "models")


def save_model(state_dir: Path, model: str, epoch: str, core: ServerCore) -> None:
    """Stage a deployment on disk."""
    d, k = _dir(state_dir), ids.key(model, epoch)
    arrays: dict[str, np.ndarray] = {}
    for i, st in core.model.items():
        arrays[f"e{i}"], arrays[f"w{i}"] = st.e, st.w_online
        if st.bias is not None:
            arrays[f"b{i}"] = st.bias
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    write_private(d / f"{k}.plan.json", json.dumps(core.plan.to_dict()).encode())
    write_private(d / f"{k}.npz", buf.getvalue())


def commit_model(state_dir: Path, model: str, epoch: str) -> None:
    """Make ``epoch`` the model's current deployment and delete the others."""
    d = _dir(state_dir)
    write_private(d / f"{ids.check('model', model)}.current", epoch.encode())
    for f in d.glob(f"{model}@*"):
        if not f.name.startswith(f"{model}@{epoch}."):
            f.unlink(missing_ok=True)


def load_models(state_dir: Path, party: int) -> dict[str, tuple[str, ServerCore]]:
    """model -> (epoch, core) of every committed deployment."""
    d = _dir(state_dir)
    out = {}
    for ptr in sorted(d.glob("*.current")):
        check_private(ptr)
        model, epoch = ptr.name[: -len(".current")], ptr.read_text().strip()
        k = ids.key(model, epoch)
        check_private(d / f"{k}.npz")
        plan = Plan.from_dict(json.loads((d / f"{k}.plan.json").read_text()))
        core = ServerCore(party, plan)
        with np.load(d / f"{k}.npz") as z:
            for i in plan.weighted_ops():
                core.model[i] = ModelShare(z[f"e{i}"], z[f"w{i}"], z[f"b{i}"] if f"b{i}" in z else None)
        out[model] = (epoch, core)
    for f in d.glob("*@*"):  # staged, never committed
        model, _, rest = f.name.partition("@")
        if model not in out or not rest.startswith(out[model][0] + "."):
            f.unlink(missing_ok=True)
    return out
