"""Reference U-Nets (names the benchmark accepts) built from MPC-friendly layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError


def _unet_class() -> Any:
    import torch
    import torch.nn as nn

    class UNet(nn.Module):
        """U-Net: per stage two 3x3 conv (pad 1) + ReLU, 2x2 max-pool, k2s2 up, skip concat, 1x1 head."""

        def __init__(self, channels: tuple[int, ...], bottleneck: int, in_channels: int = 1, classes: int = 2,
                     batchnorm: bool = False) -> None:
            super().__init__()

            def block(cin: int, cout: int) -> nn.Sequential:
                layers: list[nn.Module] = []
                for a, b in ((cin, cout), (cout, cout)):
                    layers.append(nn.Conv2d(a, b, 3, padding=1, bias=not batchnorm))
                    if batchnorm:
                        layers.append(nn.BatchNorm2d(b))
                    layers.append(nn.ReLU())
                return nn.Sequential(*layers)

            self.down = nn.ModuleList()
            cin = in_channels
            for ch in channels:
                self.down.append(block(cin, ch))
                cin = ch
            self.pool = nn.MaxPool2d(2)
            self.bottom = block(cin, bottleneck)
            self.up = nn.ModuleList()
            self.dec = nn.ModuleList()
            cin = bottleneck
            for ch in reversed(channels):
                self.up.append(nn.ConvTranspose2d(cin, ch, 2, stride=2))
                self.dec.append(block(2 * ch, ch))
                cin = ch
            self.head = nn.Conv2d(cin, classes, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for blk in self.down:
                x = blk(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottom(x)
            for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=False):
                x = dec(torch.cat([skip, up(x)], dim=1))
            return self.head(x)

    return UNet


def build_model(name: str, classes: int = 2, in_channels: int = 1, seed: int = 0, batchnorm: bool = False) -> Any:
    """``ref-unet`` (16-32-64-128, bottleneck 256) or ``trustmis-unet`` (64..512, 1024), seeded weights."""
    import torch

    specs = {"ref-unet": ((16, 32, 64, 128), 256), "trustmis-unet": ((64, 128, 256, 512), 1024)}
    if name not in specs:
        raise UsageError(f"unknown model {name!r}; known: {', '.join(specs)}")
    torch.manual_seed(seed)
    ch, bott = specs[name]
    model = _unet_class()(ch, bott, in_channels, classes, batchnorm).eval()
    with torch.no_grad():  # He init: activations keep their scale through the depth, as in a trained U-Net
        for mod in model.modules():  # (PyTorch's default shrinks them ~3x per conv: logits ~0.005, all noise)
            if isinstance(mod, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                if mod.bias is not None:
                    torch.nn.init.normal_(mod.bias, std=0.05)
    return model


MODEL_NAMES = ("ref-unet", "trustmis-unet")


ASSETS = Path(__file__).resolve().parent / "assets"
MNI_CLASSES = ["background", "csf/other", "grey matter", "white matter"]
MNI_PREPROCESS = {"kind": "mri-percentile", "p": 99}


def demo_slices() -> dict[str, np.ndarray]:
    """Bundled MNI152 slices (``calib_image``, ``test_image`` raw T1, ``test_label``, ``test_z``)."""
    path = ASSETS / "mni_slices.npz"
    if not path.exists():
        raise UsageError(f"bundled demo slices are missing ({path}); run `python -m model_owner train`")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def load_named_model(name: str, size: int = 64) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """(model, calibration samples as the model expects them, plan metadata) for a model name."""
    import torch

    from . import intensity

    if name == "mni-unet":
        path = ASSETS / "mni_unet.pt"
        if not path.exists():
            raise UsageError(f"bundled weights are missing ({path}); run `python -m model_owner train`")
        model = build_model("ref-unet", classes=len(MNI_CLASSES))
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        calib = intensity.apply(MNI_PREPROCESS, demo_slices()["calib_image"].astype(np.float32))
        geometry = {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "rot90": 1}  # blindseg.mni's training slices
        return model.eval(), calib, {"preprocess": MNI_PREPROCESS, "class_names": MNI_CLASSES, "name": name,
                                     "geometry": geometry}
    model = build_model(name, classes=2)
    calib = test_image(2, size, seed=99).astype(np.float32)
    balance_head(model, calib)
    return model, calib, {"preprocess": {"kind": "none"}, "class_names": ["background", "foreground"], "name": name}


def balance_head(model: Any, samples: np.ndarray) -> None:
    """Shift the seeded model's head biases so that on ``samples`` each class beats background on about
    half the pixels: it otherwise labels everything background, and a test on an all-background mask
    could not tell a right answer from an empty one."""
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(samples)).double()
        for c in range(1, logits.shape[1]):
            model.head.bias[c] -= float(torch.median(logits[:, c] - logits[:, 0]))


def test_image(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """A structured synthetic scan-like image (smooth blobs + noise), N x 1 x size x size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(batch):
        img = np.zeros((size, size))
        for _ in range(6):
            cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.05, 0.25)]
            img += rng.uniform(0.5, 1.5) * (np.hypot(yy - cy, xx - cx) < r)
        out.append(img + 0.1 * rng.normal(size=(size, size)))
    return np.stack(out)[:, None]
