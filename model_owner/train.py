"""Train the demo model: ref-unet shape, 4 classes, on MNI152 2 mm axial slices.

``python -m model_owner train [--out PATH] [--steps N] [--seed S]`` -- fixed seed,
single-threaded-deterministic torch ops, ~10 minutes on 2 cores. Writes the
weights (float16 state dict, a few MB) and prints plaintext test Dice per class.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from blindseg import intensity
from blindseg.mni import CLASSES, dice, load_split
from blindseg.models import build_model

PREPROCESS = {"kind": "mri-percentile", "p": 99}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "blindseg" / "assets" / "mni_unet.pt"


def write_demo_slices(path: Path | None = None, n_calib: int = 6) -> Path:
    """Ship a few MNI152 slices with the package: calibration (train slab) and the test slab with labels."""
    tr, te = load_split()
    path = path or DEFAULT_OUT.parent / "mni_slices.npz"
    pick = np.linspace(0, len(tr.image) - 1, n_calib).astype(int)
    np.savez_compressed(path, calib_image=tr.image[pick].astype(np.float16), test_image=te.image.astype(np.float16),
                        test_label=te.label, test_z=te.z)
    return path


def train(out: Path = DEFAULT_OUT, steps: int = 1500, seed: int = 0, batch: int = 8, log: Any = print) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tr, te = load_split()
    x_tr = intensity.apply(PREPROCESS, tr.image)
    x_te = intensity.apply(PREPROCESS, te.image)
    model = build_model("ref-unet", classes=len(CLASSES), seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    freq = np.bincount(tr.label.ravel(), minlength=len(CLASSES)).astype(np.float64)
    weight = torch.tensor((freq.sum() / (len(CLASSES) * freq)) ** 0.5, dtype=torch.float32)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = rng.integers(0, len(x_tr), batch)
        xb, yb = x_tr[idx].copy(), tr.label[idx].astype(np.int64)
        flip = rng.random(batch) < 0.5
        xb[flip], yb[flip] = xb[flip][..., ::-1], yb[flip][..., ::-1]
        xb *= rng.uniform(0.9, 1.1, (batch, 1, 1, 1)).astype(np.float32)
        shift = rng.integers(-6, 7, 2)
        xb = np.roll(xb, tuple(shift), axis=(2, 3))
        yb = np.roll(yb, tuple(shift), axis=(1, 2))
        logits = model(torch.from_numpy(np.ascontiguousarray(xb)))
        loss = F.cross_entropy(logits, torch.from_numpy(np.ascontiguousarray(yb)), weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s")
    model.eval()
    with torch.no_grad():
        pred = torch.argmax(model(torch.from_numpy(x_te)), 1).numpy()
    d = dice(pred, te.label)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, out)
    write_demo_slices(out.parent / "mni_slices.npz")
    report = {"test_dice": dict(zip(CLASSES, d, strict=True)), "train_slices": len(x_tr), "test_slices": len(x_te),
              "steps": steps, "seed": seed, "seconds": time.perf_counter() - t0, "weights": str(out)}
    log(json.dumps(report, indent=1))
    return report


def evaluate(batch: int = 7, log: Any = print) -> dict[str, Any]:
    """Secure (in-process engine) vs plaintext on every bundled test slice: agreement and Dice delta."""
    import asyncio

    import torch

    from blindseg.compiler import compile_model
    from blindseg.engine import run_compiled
    from blindseg.models import demo_slices, load_named_model

    model, calib, meta = load_named_model("mni-unet")
    d = demo_slices()
    x = intensity.apply(meta["preprocess"], d["test_image"].astype(np.float32))
    comp = compile_model(model, (1, 128, 128), "mask", "auto", samples=calib)
    secure: list[np.ndarray] = []
    online = 0.0
    for i in range(0, len(x), batch):
        res = asyncio.run(run_compiled(comp, x[i:i + batch]))
        if res.mask is None:
            raise RuntimeError("the plan outputs logits, not a mask")
        secure.append(res.mask)
        online += res.stats["online_seconds"]
    sec: np.ndarray = np.concatenate(secure)
    with torch.no_grad():
        plain = torch.argmax(model(torch.from_numpy(x)), 1).numpy()
    d_plain, d_sec = dice(plain, d["test_label"]), dice(sec, d["test_label"])
    per_slice = [float((sec[k] == plain[k]).mean()) for k in range(len(x))]
    report = {"slices": len(x), "frac_bits": comp.plan.frac_bits, "pixel_agreement": float((sec == plain).mean()),
              "min_slice_agreement": min(per_slice), "dice_plaintext": dict(zip(CLASSES, d_plain, strict=True)),
              "dice_secure": dict(zip(CLASSES, d_sec, strict=True)),
              "dice_delta": {c: s - p for c, s, p in zip(CLASSES, d_sec, d_plain, strict=True)},
              "online_seconds": online}
    log(json.dumps(report, indent=1))
    return report
