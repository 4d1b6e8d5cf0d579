"""Hostile input below the service: fuzzed frames, plans and sealed messages; bundle reuse; bad CLI input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindseg.compiler import compile_model
from blindseg.crypto import Opener, Sealer, generate_key
from blindseg.errors import BlindsegError, ProtocolError, UsageError
from blindseg.models import build_model
from blindseg.plan import Plan

# ------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_plan_loader_only_raises_clear_errors(data) -> None:
    try:
        Plan.from_dict(data)
    except BlindsegError:
        pass


def _small_plan() -> dict:
    model = build_model("ref-unet", classes=2, seed=0)
    x = np.random.default_rng(0).normal(size=(1, 1, 32, 32))
    return compile_model(model, (1, 32, 32), "mask", "auto", samples=x).plan.to_dict()


PLAN = _small_plan()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(PLAN["ops"]) - 1), st.sampled_from(["kind", "inputs", "shape", "params"]), json_values)
def test_fuzz_mutated_real_plans_are_refused_cleanly(i, key, value) -> None:
    d = {**PLAN, "ops": [dict(o) for o in PLAN["ops"]]}
    d["ops"][i][key] = value
    try:
        Plan.from_dict(d)
    except BlindsegError:
        pass


KEY_A, KEY_B = generate_key(), generate_key()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_opener_rejects_everything_unsealed(data: bytes) -> None:
    opener = Opener(KEY_B, KEY_A.public_key(), "d", "a", "b")
    with pytest.raises(ProtocolError):
        opener.open("t", data)


def test_sealed_messages_tamper_replay_reorder_wrong_topic() -> None:
    s = Sealer(KEY_A, KEY_B.public_key(), "d", "a", "b")
    o = Opener(KEY_B, KEY_A.public_key(), "d", "a", "b")
    m1, m2, m3 = (s.seal("t", f"msg{k}".encode()) for k in range(3))
    assert o.open("t", m1) == b"msg0"
    with pytest.raises(ProtocolError, match="replayed"):
        o.open("t", m1)
    assert o.open("t", m3) == b"msg2"
    with pytest.raises(ProtocolError, match="reordered"):
        o.open("t", m2)  # older counter after a newer one
    m4 = bytearray(s.seal("t", b"x"))
    m4[-1] ^= 0x80
    with pytest.raises(ProtocolError, match="authentication"):
        o.open("t", bytes(m4))
    with pytest.raises(ProtocolError, match="authentication"):
        o.open("other/topic", s.seal("t", b"y"))  # moved to another topic
    back = Opener(KEY_A, KEY_B.public_key(), "d", "b", "a")  # the reverse direction has its own key
    with pytest.raises(ProtocolError, match="authentication"):
        back.open("t", s.seal("t", b"z"))


# ------------------------------------------------------------------ single use


def test_reusing_a_bundle_would_leak_and_is_refused(tmp_path) -> None:
    """With the same Beaver mask A, the openings D = X - A of two inputs differ by X1 - X2: reuse leaks.
    The store and the server refuse a second use of a bundle, also after a restart."""
    from blindseg.prg import Prg
    from server.core import ServerCore
    from server.store import BundleStore

    x1, x2 = (np.random.default_rng(k).integers(0, 2**32, 100, dtype=np.uint32) for k in (1, 2))
    a = Prg(b"s" * 32, stream=1).uint32((100,))
    d1, d2 = x1 - a, x2 - a
    assert np.array_equal(d1 - d2, x1 - x2)  # what an observer of both openings learns

    plan = Plan.from_dict(PLAN)
    core = ServerCore(1, plan)
    store = BundleStore(tmp_path)
    w = store.writer("b1", "m", 1, 1, b"s" * 32)
    w.commit()
    core.begin(store, "b1", "job1")
    with pytest.raises(ProtocolError, match="already consumed"):
        core.begin(store, "b1", "job2")
    store.close()
    with pytest.raises(ProtocolError, match="already consumed"):
        core.begin(BundleStore(tmp_path), "b1", "job3")


# ------------------------------------------------------------------ bad input at the command line


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "message"), [
    (("-m", "blindseg", "bench", "--size", "17"), "multiple of 16"),
    (("-m", "blindseg", "bench", "--model", "nope", "--size", "32"), "unknown model 'nope'"),
    (("-m", "blindseg", "demo", "--net", "fast"), "network profile 'fast'"),
    (("-m", "blindseg", "chart", "/nonexistent/report.json"), "cannot read a JSON report"),
    (("-m", "server0", "--config", "/nonexistent/server0.toml"), "does not exist"),
    (("-m", "dealer", "--config", "/nonexistent/dealer.toml"), "does not exist"),
    (("-m", "data_owner", "segment", "--config", "/nonexistent/x.toml", "--model", "m", "--input", "demo",
      "--out", "/tmp/blindseg-never"), "does not exist"),
    (("-m", "model_owner", "deploy", "--config", "/nonexistent/x.toml"), "does not exist"),
])
def test_cli_user_errors_exit_2_without_traceback(args, message) -> None:
    r = _run(*args)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert message in out and "Traceback" not in out


def test_cli_wrong_role_config_and_expired_key(tmp_path) -> None:
    from blindseg.kit import init

    paths = init(tmp_path / "kit", plain=True)
    r = _run("-m", "server0", "--config", str(paths["server1"]))
    assert r.returncode == 2 and "not of 'server0'" in r.stdout + r.stderr
    text = paths["dealer"].read_text()
    import re

    paths["dealer"].write_text(re.sub(r"key_expires = \S+", "key_expires = 2020-01-01", text))
    r = _run("-m", "dealer", "--config", str(paths["dealer"]))
    assert r.returncode == 2 and "key expired on 2020-01-01" in r.stdout + r.stderr
    paths["dealer"].write_text("this is = = not toml")
    r = _run("-m", "dealer", "--config", str(paths["dealer"]))
    assert r.returncode == 2 and "not valid TOML" in r.stdout + r.stderr


def test_data_owner_refuses_nan_before_anything_leaves() -> None:
    from data_owner import share_image

    plan = Plan.from_dict(PLAN)
    x = np.zeros((1, 1, 32, 32))
    x[0, 0, 3, 3] = np.nan
    with pytest.raises(UsageError, match="NaN"):
        share_image(plan, x)
    with pytest.raises(UsageError, match="expects"):
        share_image(plan, np.zeros((1, 2, 32, 32)))
