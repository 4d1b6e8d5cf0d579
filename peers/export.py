"""Write the seeded ``ref-unet`` (or another bench model) and a test image for the peers' scripts.

``.venv/bin/python peers/export.py OUT_DIR [MODEL] [SIZE]`` writes OUT_DIR/weights.npz (the
model's ``state_dict``, the very weights ``blindseg bench --model MODEL`` runs) and OUT_DIR/image.npy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from blindseg.models import build_model


def main() -> None:
    out = Path(sys.argv[1])
    name = sys.argv[2] if len(sys.argv) > 2 else "ref-unet"
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(name)
    np.savez(out / "weights.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    image = np.random.default_rng(0).standard_normal((1, 1, size, size)).astype(np.float32)
    np.save(out / "image.npy", image)


if __name__ == "__main__":
    main()
