"""What the whole-service tests share: the Mosquitto skip marks, short timeouts, the reference mask,
reading a role's log, and one job that must succeed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from blindseg.bench import test_image as synthetic_image
from blindseg.config import PartyConfig
from blindseg.demo import LocalDeployment
from blindseg.models import load_named_model
from data_owner.client import Client

NEEDS_MOSQUITTO = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                       reason="the mosquitto binary is not installed on this machine"),
]
SIZE = 32
TIMEOUTS = {"round_timeout": 4, "bundle_wait": 6, "job_timeout": 15}


def reference_mask() -> tuple[np.ndarray, np.ndarray]:
    """A test image and the plaintext ref-unet's mask of it."""
    model, _, _ = load_named_model("ref-unet", SIZE)
    x = synthetic_image(1, SIZE, seed=5).astype(np.float32)
    with torch.no_grad():
        return x, torch.argmax(model(torch.from_numpy(x)), 1).numpy()


def assert_faithful(mask: np.ndarray, logits: np.ndarray, margin: float = 0.02, overall: float = 0.995) -> None:
    """The secure mask equals the float model's argmax on every pixel where the float model is decisive
    (top-2 logit gap over ``margin``, more than ten times the fixed-point error of these models), and on
    at least ``overall`` of all pixels (the rest sit on the decision boundary)."""
    top = np.sort(logits, axis=1)
    decisive = (top[:, -1] - top[:, -2]) > margin
    want = logits.argmax(1)
    wrong = int((mask[decisive] != want[decisive]).sum())
    assert wrong == 0, f"{wrong} of {int(decisive.sum())} decisive pixels differ from the float model"
    assert (mask == want).mean() >= overall, f"agreement {(mask == want).mean():.5f}"


def role_log(dep: LocalDeployment, role: str) -> str:
    return (dep.root / "logs" / f"{role}.log").read_text()


async def segment_ok(dep: LocalDeployment, reference: tuple[np.ndarray, np.ndarray], tenant: str = "data_owner",
                     **kw: object) -> None:
    x, want = reference
    async with Client(PartyConfig.load(dep.configs[tenant]), timeout=60) as c:
        mask, _ = await c.segment("m", x, **kw)  # type: ignore[arg-type]
    assert (mask == want).mean() >= 0.99
