"""Whole secure U-Net runs (in-process, all five roles) vs float and fixed-point references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from blindseg import secure_segment
from blindseg.errors import ScaleOverflowError, UnsupportedLayerError, UsageError
from blindseg.models import build_model
from blindseg.plan import encode_weights, reference
from blindseg.ring import encode


def structured(n: int, size: int) -> np.ndarray:
    """Blobs and rings: image-like inputs with large flat regions and sharp edges."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = []
    for k in range(n):
        r = np.hypot(yy - 0.3 - 0.1 * k, xx - 0.6)
        imgs.append(np.where(r < 0.25, 1.5, 0.0) + np.sin(8 * xx + k) * 0.3 - 0.5 * (r > 0.4))
    return np.stack(imgs)[:, None]


def float_mask(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.argmax(model(torch.tensor(x, dtype=torch.float32)), 1).numpy()


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ref_unet_mask_matches_float(kind: str) -> None:
    model = build_model("ref-unet", seed=3)
    x = np.random.default_rng(5).normal(size=(2, 1, 48, 48)) if kind == "random" else structured(2, 48)
    res = secure_segment(model, x)
    assert res.mask is not None and res.mask.shape == (2, 48, 48)
    agree = float(np.mean(res.mask == float_mask(model, x)))
    assert agree >= 0.999, f"pixel agreement {agree:.5f}"
    st = res.stats
    assert st["rounds"] > 0 and st["online_bytes_per_server"] > 0 and st["offline_bytes_per_server"] > 0
    assert st["offline_bytes"][0] < 200  # server 0's bundle is only a seed
    assert sum(layer["rounds"] for layer in st["layers"]) == st["rounds"]


def test_logits_match_fixed_point_reference_and_float() -> None:
    model = build_model("ref-unet", classes=3, seed=1)
    x = np.random.default_rng(2).normal(size=(1, 1, 32, 32))
    res = secure_segment(model, x, output="logits")
    assert res.logits is not None and res.mask is None
    from blindseg.compiler import compile_model

    comp = compile_model(model, (1, 32, 32), "logits", "auto", samples=x)
    ref = reference(comp.plan, encode_weights(comp), encode(x, comp.plan.frac_bits))[-1]
    # fixed-point reference (floor truncations; the secure run rounds without bias): each truncation may add
    # one LSB of its value's scale that propagates; stay within 128 LSB of the input's scale
    err_fx = np.max(np.abs(res.logits - ref / 2.0**comp.plan.output_scale))
    f = comp.plan.frac_bits
    with torch.no_grad():
        fl = model(torch.tensor(x, dtype=torch.float32)).numpy()
    err_float = np.max(np.abs(res.logits - fl))
    assert err_fx <= 128 * 2.0**-f, f"logit error vs fixed-point reference {err_fx}"
    assert err_float <= 0.01 * max(1.0, float(np.max(np.abs(fl)))), f"logit error vs float {err_float}"


def test_batchnorm_avgpool_add_identity_fold() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(2, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.pool = nn.AvgPool2d(2)
            self.pool3 = nn.AvgPool2d(3, 1)
            self.drop = nn.Dropout(0.5)
            self.idn = nn.Identity()
            self.head = nn.Conv2d(4, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.relu(self.bn(self.c1(x)))
            b = torch.relu(self.c2(a)) + a
            return self.head(self.idn(self.drop(self.pool3(self.pool(b)))))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(1).normal(size=(1, 2, 20, 20))
    res = secure_segment(net, x, output="logits")
    with torch.no_grad():
        fl = net(torch.tensor(x, dtype=torch.float32)).numpy()
    assert np.max(np.abs(res.logits - fl)) < 0.02


def test_unsupported_layer_is_named() -> None:
    """Named as the user wrote it (module path and type, or torch.tanh), never a memory address."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 1))
    with pytest.raises(UnsupportedLayerError, match="unsupported op Tanh at '1'") as e:
        secure_segment(net, np.zeros((1, 1, 8, 8)))
    assert " 0x" not in str(e.value)

    class Fn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(self.c(x), scale_factor=2, mode="bicubic")

    with pytest.raises(UnsupportedLayerError, match="F.interpolate at 'interpolate'") as e:
        secure_segment(Fn(), np.zeros((1, 1, 8, 8)))
    assert " 0x" not in str(e.value)
    for layer, what in ((nn.Conv3d(1, 2, 3), "Conv3d at '0': a 3D layer on a value with 2 spatial dimensions"),
                        (nn.LayerNorm([1, 8, 8]), "LayerNorm .* other axes")):
        with pytest.raises(UnsupportedLayerError, match=what):
            secure_segment(nn.Sequential(layer, nn.Conv2d(2 if "3D" in what else 1, 2, 1)), np.zeros((1, 1, 8, 8)))


def test_bad_inputs_get_clear_errors() -> None:
    model = build_model("ref-unet")
    with pytest.raises(UsageError, match="N x C x H x W"):
        secure_segment(model, np.zeros((16, 16)))
    with pytest.raises(UsageError, match="NaN"):
        secure_segment(model, np.full((1, 1, 16, 16), np.nan))
    with pytest.raises(UsageError, match="numeric"):
        secure_segment(model, np.array([[[["a"]]]]))
    with pytest.raises(UsageError):
        secure_segment(model, np.zeros((1, 2, 16, 16)))  # 2 channels into a 1-channel conv


def test_overflowing_scale_is_refused() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3))
    with torch.no_grad():
        net[0].weight.fill_(1e6)
    with pytest.raises(ScaleOverflowError):
        secure_segment(net, np.ones((1, 1, 8, 8)), frac_bits=12, output="logits")
    with pytest.raises(ScaleOverflowError):
        secure_segment(net, np.ones((1, 1, 8, 8)) * 1e4, output="logits")


def test_functional_pooling_and_relu() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 3, 3, padding=1)
            self.h = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.max_pool2d(torch.nn.functional.relu(self.c(x)), 2)
            return self.h(torch.nn.functional.avg_pool2d(y, kernel_size=2, stride=2))

    torch.manual_seed(4)
    net = Net().eval()
    x = np.random.default_rng(3).normal(size=(1, 1, 16, 16))
    res = secure_segment(net, x, output="logits")
    with torch.no_grad():
        fl = net(torch.tensor(x, dtype=torch.float32)).numpy()
    assert res.logits.shape == fl.shape
    assert np.max(np.abs(res.logits - fl)) < 0.01


def test_more_than_256_classes_end_to_end() -> None:
    """300 classes: labels need 9 bits, leave the servers as uint16 and match torch.argmax; more than
    the supported number of classes is refused with a message that says so."""
    import torch

    from blindseg.plan import Op, Plan

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 300, 1)).eval()
    with torch.no_grad():
        net[2].bias[256:] += 0.3  # labels above 255 win often (a uint8 would wrap them)
    x = np.random.default_rng(3).uniform(-1, 1, size=(1, 1, 8, 8))
    res = secure_segment(net, x, calibration=np.random.default_rng(4).uniform(-1, 1, size=(4, 1, 8, 8)))
    with torch.no_grad():
        logits = net(torch.tensor(x, dtype=torch.float32))
    want = torch.argmax(logits, 1).numpy()
    top2 = torch.topk(logits, 2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]).numpy() > 0.05
    assert (want[decisive] > 255).mean() > 0.2
    assert np.array_equal(res.mask[decisive], want[decisive]) and decisive.mean() > 0.5
    assert (res.mask == want).mean() >= 0.9  # the rest are near-ties among 300 random logits
    assert res.mask.max() <= 299
    with pytest.raises(UsageError, match="70000 classes"):
        Plan((Op("input", (), (70000, 2, 2)), Op("argmax", (0,), (1, 2, 2), {"classes": 70000, "bits": 17})),
             8, "mask")


def test_input_size_rule_is_stated() -> None:
    """A U-Net whose skip connections need the input to be a multiple of 16 says so."""
    model = build_model("ref-unet", classes=2)
    with pytest.raises(UsageError, match=r"input size \(40, 40\) must be a multiple of 16 for this model"):
        secure_segment(model, np.random.default_rng(0).normal(size=(1, 1, 40, 40)),
                       calibration=np.random.default_rng(1).normal(size=(2, 1, 40, 40)))


def test_bench_pair_measures_a_correct_job() -> None:
    """The benchmark's per-role measurements (dealer, ingest, each server's online steps without a
    transport) time a real job: its output shares reconstruct to the float model's mask."""
    import tempfile

    from blindseg.bench import _Pair, offline_compute
    from blindseg.compiler import compile_model
    from data_owner import reconstruct
    from tests.deployed import assert_faithful

    model = build_model("ref-unet", seed=4)
    x = structured(1, 32)
    comp = compile_model(model, (1, 32, 32), "mask", "auto", samples=x)
    with tempfile.TemporaryDirectory() as tmp:
        pair = _Pair(comp, 1, tmp)
        took: dict[str, float] = {}
        busy, outs = pair.online(pair.bundle(took), x)
        pair.close()
    assert set(took) == {"dealer", "server0", "server1"} and min(busy) > 0
    with torch.no_grad():
        logits = model(torch.tensor(x, dtype=torch.float32)).numpy()
    assert_faithful(reconstruct(comp.plan, outs[0], outs[1]), logits)
    off = offline_compute(comp, repeats=1)
    assert off["dealer_seconds"] > 0 and len(off["ingest_seconds"]) == 2
    # (bench.thread_scaling is not run here: switching numba's thread count in the test process slowed the
    # namespace placement test that runs later in the same process by ~17%)


def test_two_jobs_on_one_deployment_each_use_a_fresh_bundle() -> None:
    """run_compiled(jobs=2): the second job on the same deployment consumes its own bundle and is as
    correct as the first (a reused or missing bundle would fail or corrupt it)."""
    import asyncio

    from blindseg.compiler import compile_model
    from blindseg.engine import run_compiled
    from tests.deployed import assert_faithful

    model = build_model("ref-unet", seed=6)
    x = structured(1, 32)
    comp = compile_model(model, (1, 32, 32), "mask", "auto", samples=x)
    res = asyncio.run(run_compiled(comp, x, jobs=2))
    assert len(res.stats["jobs_online_seconds"]) == 2 and res.mask is not None
    with torch.no_grad():
        assert_faithful(res.mask, model(torch.tensor(x, dtype=torch.float32)).numpy())
    assert res.stats["offline_bytes"][0] < 200 and res.stats["dealer_seconds"] > 0
    # each server reports how much of its rounds' time it spent in its own protocol steps
    for run, comp_s in zip(res.stats["server_run_seconds"], res.stats["server_compute_seconds"], strict=True):
        assert 0 < comp_s <= run <= res.stats["online_seconds"]


def test_steps_short_in_the_last_job_run_without_a_thread_handoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The round driver runs a step that took under INLINE_BELOW in the previous job on the event loop:
    the second job hands fewer steps to worker threads than it runs, and its mask is still right."""
    import asyncio

    import server.core as sc
    from blindseg.compiler import compile_model
    from blindseg.engine import run_compiled
    from tests.deployed import assert_faithful

    handed: list[int] = []
    real = asyncio.to_thread

    async def counting(func, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        if func is sc._step:
            handed.append(1)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    model = build_model("ref-unet", seed=7)
    x = structured(1, 32)
    comp = compile_model(model, (1, 32, 32), "mask", "auto", samples=x)
    res = asyncio.run(run_compiled(comp, x, jobs=2))
    steps = 2 * 2 * (res.stats["rounds"] + 1)  # two servers, two jobs, one step per round plus the last
    assert 2 * (res.stats["rounds"] + 1) < len(handed) < steps  # the first job all threaded, the second not
    assert res.mask is not None
    with torch.no_grad():
        assert_faithful(res.mask, model(torch.tensor(x, dtype=torch.float32)).numpy())


@pytest.mark.slow
def test_service_bench_on_the_embedded_broker_matches_the_in_process_run() -> None:
    """``blindseg bench --transport mqtt --broker embedded``: the whole service (dealer and servers as
    processes) through the demo's embedded amqtt broker computes the in-process mask, with the same rounds
    and the same online bytes before sealing is counted (sealed frames are larger, never smaller)."""
    import asyncio

    from blindseg.bench import run_mqtt_bench

    r = asyncio.run(run_mqtt_bench("ref-unet", 32, broker="embedded", repeats=1))
    assert r["broker"] == "embedded" and r["agreement_with_inprocess"] >= 0.99 and r["pixel_agreement"] >= 0.98
    assert r["rounds"] == r["inprocess_rounds"] > 0
    assert r["online_bytes_per_server"] >= r["inprocess_online_bytes_per_server"]
    assert all(0 < c <= t <= r["online_seconds"] for c, t in zip(r["server_compute_seconds"], r["server_run_seconds"],
                                                                 strict=True))
