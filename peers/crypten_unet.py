"""CrypTen 0.4.1 on blindseg's reference U-Net: two parties (plus its TTP), gloo on loopback.

Run in CrypTen's own venv (``make peers``): ``python peers/crypten_unet.py WEIGHTS.npz IMAGE.npy``.
Optional third argument: the provider (TFP default; TTP). Prints one JSON object: online seconds of the second of two forwards (the first warms up),
bytes sent per party, rounds, and pixel agreement of the argmax with a float32 torch forward.

Two fixes make 0.4.1 import under torch >= 2.1: the symbolic registry module it probes moved
(a stub stands in; its ONNX importer is not used: the network is written with CrypTen's tensor
ops, see ``unet_forward.py``).
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet_forward import forward  # noqa: E402


def _import_crypten():  # type: ignore[no-untyped-def]
    name = "torch.onnx._internal.registration"
    if name not in sys.modules:
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.registry = None  # type: ignore[attr-defined]
            sys.modules[name] = stub
    import crypten

    return crypten


def plain_ops() -> dict:
    return {
        "conv": lambda x, w, b, p: F.conv2d(x, w, b, padding=p),
        "relu": F.relu,
        "pool": lambda x: F.max_pool2d(x, 2),
        "up": lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2),
        "cat": lambda a, b: torch.cat([a, b], dim=1),
    }


def secure_ops(crypten) -> dict:  # type: ignore[no-untyped-def]
    return {
        "conv": lambda x, w, b, p: x.conv2d(w, padding=p) + b.view(1, -1, 1, 1),
        "relu": lambda x: x.relu(),
        "pool": lambda x: x.max_pool2d(2),
        "up": lambda x, w, b: x.conv_transpose2d(w, stride=2) + b.view(1, -1, 1, 1),
        "cat": lambda a, b: crypten.cat([a, b], dim=1),
    }


def main() -> None:
    weights_path, image_path = sys.argv[1], sys.argv[2]
    provider = sys.argv[3] if len(sys.argv) > 3 else "TFP"  # TTP: see README (did not finish here)
    crypten = _import_crypten()
    crypten.cfg.communicator.verbose = True
    crypten.cfg.mpc.provider = provider
    weights = {k: torch.from_numpy(v).float() for k, v in np.load(weights_path).items()}
    image = torch.from_numpy(np.load(image_path)).float()

    @crypten.mpc.context.run_multiprocess(world_size=2)
    def party() -> dict:
        rank = crypten.comm.get().get_rank()
        # the image comes from party 0 (the hospital's side), the weights from party 1
        x = crypten.cryptensor(image, src=0)
        w = {k: crypten.cryptensor(v, src=1) for k, v in weights.items()}
        comm = crypten.comm.get()
        out = {}
        for run in range(2):
            comm.reset_communication_stats()
            t = time.perf_counter()
            y = forward(x, w, secure_ops(crypten))
            elapsed = time.perf_counter() - t
            stats = comm.get_communication_stats()
            out = {"online_seconds": elapsed, "bytes_per_party": int(stats["bytes"]),
                   "rounds": int(stats["rounds"]), "run": run}
        logits = y.get_plain_text()
        if rank == 0:
            out["mask"] = logits.numpy().argmax(1).astype(np.uint8).tobytes()
        return out

    results = party()
    r0 = results[0]
    secure_mask = np.frombuffer(r0.pop("mask"), np.uint8)
    with torch.no_grad():
        plain = forward(image, weights, plain_ops()).numpy()
    r0["pixel_agreement"] = float((secure_mask == plain.argmax(1).astype(np.uint8).ravel()).mean())
    r0["provider"] = provider
    r0["system"] = f"CrypTen {getattr(crypten, '__version__', '0.4.1')}"
    print(json.dumps(r0))


if __name__ == "__main__":
    main()
