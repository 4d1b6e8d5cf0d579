"""Per-layer cost chart (matplotlib) from any run or benchmark report.

A report is a dict (or its JSON file) with ``layers``: a list of
``{"name", "kind", "online_seconds", "online_bytes", "offline_bytes"}`` -- what
``blindseg bench --json`` prints and what the data owner writes in ``report.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UsageError
from .plan import Plan


def layer_rows(plan: Plan, online: list[dict[int, tuple[float, int, int]]], offline: dict[int, int]
               ) -> list[dict[str, Any]]:
    """The per-layer list of a report: per op, the larger of the servers' online (seconds, bytes, rounds)
    and the offline bytes; ops that cost nothing are left out."""
    rows = []
    for i, op in enumerate(plan.ops):
        mine = [per[i] for per in online if i in per]
        if not mine and not offline.get(i):
            continue
        rows.append({"op": i, "kind": op.kind, "name": op.name, "shape": list(op.shape),
                     "online_seconds": max((m[0] for m in mine), default=0.0),
                     "online_bytes": max((m[1] for m in mine), default=0),
                     "rounds": max((m[2] for m in mine), default=0), "offline_bytes": offline.get(i, 0)})
    return rows


def sum_layers(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-layer costs of several jobs added up (one row per op)."""
    total: dict[int, dict[str, Any]] = {}
    for layers in runs:
        for row in layers:
            t = total.get(int(row["op"]))
            if t is None:
                total[int(row["op"])] = dict(row)
            else:
                for k in ("online_seconds", "online_bytes", "offline_bytes", "rounds"):
                    t[k] += row[k]
    return [total[k] for k in sorted(total)]


def load_report(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        r = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{p}: cannot read a JSON report ({e.__class__.__name__})") from None
    if not isinstance(r, dict) or not isinstance(r.get("layers"), list) or not r["layers"]:
        raise UsageError(f"{p}: the report has no per-layer 'layers' list")
    return r


def cost_chart(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Online seconds, online MB and offline MB per layer, as a three-panel bar chart (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [L for L in report["layers"] if L.get("online_bytes", 0) or L.get("offline_bytes", 0)]
    names = [f"{L.get('name') or L.get('kind')}" for L in layers]
    colors = {"conv": "#4c72b0", "convt": "#55a868", "rescale": "#c44e52", "maxpool": "#8172b2", "argmax": "#ccb974"}
    col = [colors.get(str(L.get("kind")), "#888888") for L in layers]
    fig, axes = plt.subplots(3, 1, figsize=(max(8, len(layers) * 0.22), 8), dpi=110, sharex=True)
    panels = [("online_seconds", 1.0, "online s"), ("online_bytes", 1e-6, "online MB / server"),
              ("offline_bytes", 1e-6, "offline MB (server1)")]
    for ax, (key, scale, label) in zip(axes, panels, strict=True):
        ax.bar(range(len(layers)), [float(L.get(key, 0)) * scale for L in layers], color=col)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(layers)))
    axes[-1].set_xticklabels(names, rotation=90, fontsize=6)
    fig.suptitle(title or f"blindseg per-layer cost ({report.get('model', '')})", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".part.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(p)
    return p
