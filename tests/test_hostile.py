"""Hostile input below the service: fuzzed frames, plans and sealed messages; bundle reuse; bad CLI input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindseg.compiler import compile_model
from blindseg.crypto import SecureLink, generate_key, session_id, session_key
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
T_AB, T_BA = "blindseg/d/b/a", "blindseg/d/a/b"  # a -> b travels on b's inbox topic


def _pair(a_key=KEY_A, b_key=KEY_B) -> tuple[SecureLink, SecureLink]:
    """Two links after a complete handshake (a says hello first)."""
    a = SecureLink(a_key, b_key.public_key(), generate_key(), "d", "a", "b")
    b = SecureLink(b_key, a_key.public_key(), generate_key(), "d", "b", "a")
    assert b.accept(T_AB, a.hello(T_AB)) == (True, True)  # new session; a does not know b's ephemeral yet
    assert a.accept(T_BA, b.hello(T_BA)) == (True, False)
    return a, b


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_links_reject_everything_unsealed(data: bytes) -> None:
    a, b = _pair()
    with pytest.raises(ProtocolError):
        b.open(T_AB, data)
    with pytest.raises(ProtocolError):
        b.accept(T_AB, data)


def test_sealed_messages_tamper_replay_reorder_wrong_topic() -> None:
    a, b = _pair()
    m1, m2, m3 = (a.seal(T_AB, f"msg{k}".encode()) for k in range(3))
    assert b.open(T_AB, m1) == b"msg0"
    with pytest.raises(ProtocolError, match="replayed"):
        b.open(T_AB, m1)
    assert b.open(T_AB, m3) == b"msg2"
    with pytest.raises(ProtocolError, match="reordered"):
        b.open(T_AB, m2)  # older counter after a newer one
    m4 = bytearray(a.seal(T_AB, b"x"))
    m4[-1] ^= 0x80
    with pytest.raises(ProtocolError, match="authentication"):
        b.open(T_AB, bytes(m4))
    with pytest.raises(ProtocolError, match="authentication"):
        b.open("other/topic", a.seal(T_AB, b"y"))  # moved to another topic
    with pytest.raises(ProtocolError, match="unknown session"):
        a.open(T_AB, a.seal(T_AB, b"z"))  # the reverse direction has its own session and key
    assert a.open(T_BA, b.seal(T_BA, b"back")) == b"back"


def test_handshake_is_authenticated_by_the_static_keys() -> None:
    a, _ = _pair()
    mallory = SecureLink(generate_key(), KEY_B.public_key(), generate_key(), "d", "a", "b")  # claims to be a
    b = SecureLink(KEY_B, KEY_A.public_key(), generate_key(), "d", "b", "a")
    with pytest.raises(ProtocolError, match="handshake failed authentication"):
        b.accept(T_AB, mallory.hello(T_AB))
    with pytest.raises(ProtocolError, match="handshake failed authentication"):
        b.accept(T_AB, a.hello("blindseg/d/c/a"))  # a's hello to another party, redirected to b
    h = bytearray(a.hello(T_AB))
    h[10] ^= 1  # swap in another ephemeral
    with pytest.raises(ProtocolError, match="handshake failed authentication"):
        b.accept(T_AB, bytes(h))


def test_a_frame_from_another_run_never_verifies() -> None:
    """Replays across runs: each run of either party has new keys; a retired run cannot come back."""
    a, b = _pair()
    old_hello, old = a.hello(T_AB), a.seal(T_AB, b"plan")
    delayed = a.seal(T_AB, b"held back by the broker")
    assert b.open(T_AB, old) == b"plan"
    # a restarts: a new ephemeral, the same static key
    a2 = SecureLink(KEY_A, KEY_B.public_key(), generate_key(), "d", "a", "b")
    assert b.accept(T_AB, a2.hello(T_AB)) == (True, True)
    assert a2.accept(T_BA, b.hello(T_BA)) == (True, False)
    for frame in (old, delayed):  # replayed after the restart, or delivered late from the earlier run
        with pytest.raises(ProtocolError, match="unknown session"):
            b.open(T_AB, frame)
    with pytest.raises(ProtocolError, match="stale handshake"):
        b.accept(T_AB, old_hello)  # the broker cannot roll b back to a's earlier run
    assert b.open(T_AB, a2.seal(T_AB, b"new")) == b"new"
    # b restarts too: a2's frames to the old b never open at the new b
    b2 = SecureLink(KEY_B, KEY_A.public_key(), generate_key(), "d", "b", "a")
    to_old_b = a2.seal(T_AB, b"x")
    b2.accept(T_AB, a2.hello(T_AB))
    with pytest.raises(ProtocolError, match="unknown session"):
        b2.open(T_AB, to_old_b)


def test_session_key_formula_opens_a_sealed_frame() -> None:
    """Control for the forward-secrecy test in test_service: with the ephemeral DH the published formula
    reproduces the link's key (so failing without it means ee is what is missing)."""
    ea, eb = generate_key(), generate_key()
    a = SecureLink(KEY_A, KEY_B.public_key(), ea, "d", "a", "b")
    b = SecureLink(KEY_B, KEY_A.public_key(), eb, "d", "b", "a")
    b.accept(T_AB, a.hello(T_AB))
    a.accept(T_BA, b.hello(T_BA))
    frame = a.seal(T_AB, b"secret")
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    pa, pb = a.e_pub, b.e_pub
    k = session_key(ea.exchange(eb.public_key()), KEY_A.exchange(eb.public_key()), ea.exchange(KEY_B.public_key()),
                    pa, pb, "d", "a", "b")
    assert frame[4:20] == session_id(pa, pb)
    assert AESGCM(k).decrypt(b"\0\0\0\0" + bytes(frame[20:28]), bytes(frame[28:]),
                             bytes(frame[:28]) + T_AB.encode()) == b"secret"


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


# ------------------------------------------------------- ids, plans, state files


@pytest.mark.parametrize("bad", ["../../x", "a/b", "", "x" * 65, "-lead", "m@e", "+", "#", "a.b", "ü"])
def test_ids_are_checked_at_the_message_boundary(bad: str) -> None:
    """An id from a peer ends up in paths, topics and SQL: one pattern, refused at decode."""
    from blindseg.messages import Deploy, GetPlan, Job, decode
    from blindseg.wire import encode_frame

    for header in ({"t": "getplan", "model": bad},
                   {"t": "job", "job": bad, "model": "m", "epoch": "e", "batch": 1},
                   {"t": "job", "job": "j", "model": "m", "epoch": bad, "batch": 1},
                   {"t": "deploy", "model": bad, "epoch": "e", "tenants": [], "plan": {}, "ops": [], "bias": []}):
        arrays = [np.zeros((1, 1, 2, 2), np.uint32)] if header["t"] == "job" else []
        with pytest.raises(ProtocolError, match="id .* is not valid"):
            decode(encode_frame(header, arrays))
    with pytest.raises(UsageError, match="is not valid"):
        GetPlan(bad)
    assert Job and Deploy  # the typed constructors refuse the same (UsageError: the caller's bug)


def test_plan_parameters_are_bounded_on_load() -> None:
    """A plan from a peer cannot ask for unbounded material: layer parameters, shapes and the job's
    material are all capped."""
    from blindseg.plan import check_budget

    d = {**PLAN, "ops": [dict(o) for o in PLAN["ops"]]}
    i = next(k for k, o in enumerate(d["ops"]) if o["kind"] == "maxpool")
    d["ops"][i] = {**d["ops"][i], "params": {"kernel": 10**6, "stride": 10**6}}
    with pytest.raises(UsageError, match="pool kernel"):
        Plan.from_dict(d)
    d = {**PLAN, "ops": [dict(o) for o in PLAN["ops"]]}
    d["ops"][0] = {**d["ops"][0], "shape": [1, 60000, 60000]}
    with pytest.raises(UsageError, match="invalid shape"):
        Plan.from_dict(d)
    plan = Plan.from_dict(PLAN)
    need = check_budget(plan, 1 << 40)
    with pytest.raises(UsageError, match="over the configured limit"):
        check_budget(plan, need - 1)
    with pytest.raises(UsageError, match="over the configured limit"):
        check_budget(plan, need * 100, batch=1000)


def test_state_is_private_and_loose_permissions_are_refused(tmp_path) -> None:
    import os
    import stat

    from server.store import BundleStore

    store = BundleStore(tmp_path / "s" / "bundles")
    w = store.writer("b1", "m@e1", 1, 1, b"s" * 32)
    w.put(0, [np.zeros(4, np.uint32)])
    w.commit()
    store.close()
    for p in [tmp_path / "s" / "bundles", *(tmp_path / "s" / "bundles").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} is {mode:04o}"
    os.chmod(tmp_path / "s" / "bundles", 0o755)
    with pytest.raises(UsageError, match="mode 0755.*chmod 700"):
        BundleStore(tmp_path / "s" / "bundles")
    os.chmod(tmp_path / "s" / "bundles", 0o700)
    os.chmod(tmp_path / "s" / "bundles" / "bundles.sqlite", 0o644)
    with pytest.raises(UsageError, match="mode 0644.*chmod 600"):
        BundleStore(tmp_path / "s" / "bundles")


def test_early_and_partial_frames_are_bounded() -> None:
    """A broker cannot grow a party's memory: early frames are capped in count, bytes and age, and a
    receiver holds one partial frame per peer (a new frame drops an unfinished one)."""
    import time

    from blindseg.channel import _Inbox
    from blindseg.transport import BrokerAddress, MqttTransport

    box = _Inbox(max_frames=3, max_bytes=100, max_age=60)
    for k in range(5):
        box.deliver(f"l{k}", b"x" * 10)
    assert sorted(box.early) == ["l2", "l3", "l4"] and box.expired == 2
    box.deliver("big", b"y" * 95)  # over the byte budget: the oldest go first
    assert "big" in box.early and box._bytes <= 100
    box.early["big"] = (box.early["big"][0], time.monotonic() - 61)  # an old one
    box.deliver("new", b"z")
    assert "big" not in box.early
    with pytest.raises(ProtocolError, match="larger than the early-arrival budget"):
        box.deliver("huge", b"w" * 101)

    t = MqttTransport("d", "b", KEY_B, {"a": KEY_A.public_key()}, BrokerAddress("127.0.0.1", 1), chunk=16)
    ep = t.endpoints["a"]
    assert ep._assemble("x", 1, 0, 3, 40, memoryview(b"0" * 16)) is None
    assert ep._assemble("y", 2, 0, 2, 20, memoryview(b"1" * 16)) is None  # supersedes frame 1
    assert ep._partial is not None and ep._partial.fid == 2 and any("dropped incomplete" in r for r in t.rejected)
    with pytest.raises(ProtocolError, match="does not belong"):
        ep._assemble("x", 1, 1, 3, 40, memoryview(b"0" * 16))  # frame 1's next chunk: spliced
    with pytest.raises(ProtocolError, match="over the size limit"):
        ep._assemble("z", 3, 0, 2, 17, memoryview(b"2" * 17))  # a chunk larger than the chunk size
    assert ep._assemble("w", 4, 0, 2, 20, memoryview(b"3" * 16)) is None
    with pytest.raises(ProtocolError, match="announced 20"):
        ep._assemble("w", 4, 1, 2, 20, memoryview(b"3" * 3))  # shortened last chunk
    assert ep._assemble("v", 5, 0, 1, 5, memoryview(b"hello")) == b"hello"
    with pytest.raises(ProtocolError, match="older than the last one"):
        ep._assemble("v", 5, 0, 1, 5, memoryview(b"hello"))


def test_clock_skew_is_named_once_at_connect(caplog, monkeypatch) -> None:
    import logging
    import time

    from blindseg import crypto
    from blindseg.transport import BrokerAddress, MqttTransport

    t = MqttTransport("d", "b", KEY_B, {"server1": KEY_A.public_key()}, BrokerAddress("127.0.0.1", 1))
    peer = SecureLink(KEY_A, KEY_B.public_key(), generate_key(), "d", "server1", "b")
    real = time.time
    monkeypatch.setattr(crypto.time, "time", lambda: real() + 412)
    hello = peer.hello("blindseg/d/b/server1")
    monkeypatch.setattr(crypto.time, "time", real)
    t._spawn = lambda coro: coro.close()  # no broker here: the reply hello is not sent
    with caplog.at_level(logging.WARNING, "blindseg.transport"):
        t.endpoints["server1"]._receive("blindseg/d/b/server1", hello)
    assert "clock of server1 is 412 s ahead of this host's" in caplog.text
    assert t.endpoints["server1"]._ready.is_set()  # nothing depends on the clock: the link works


def test_secrets_never_appear_in_reprs(tmp_path) -> None:
    from blindseg.config import PartyConfig
    from blindseg.crypto import private_bytes
    from blindseg.kit import init
    from blindseg.messages import BundleAnnounce, Masks
    from dealer.core import Bundle

    seed = bytes(range(32))
    paths = init(tmp_path / "kit", broker_host="127.0.0.1")
    cfg = PartyConfig.load(paths["server0"])
    a, _ = _pair()
    objects = [Masks("m", "e", seed), BundleAnnounce("b", "m", "e", 1, 0, seed), Bundle("b", "m@e", 1, 0, seed),
               cfg, cfg.broker, a]
    secrets = [seed.hex(), repr(seed), str(list(seed)[:8])[1:-1], cfg.broker.password, private_bytes(cfg.key).hex()]
    for obj in objects:
        text = repr(obj) + str(obj)
        for s in secrets:
            assert s not in text, f"{type(obj).__name__} shows a secret"


@pytest.mark.parametrize("key,value", [("inputs", [float("inf")]), ("inputs", [1.7]), ("shape", [float("nan")]),
                                       ("shape", [16.5, 32]), ("inputs", ["1"])])
def test_non_integer_plan_fields_are_refused_not_truncated(key: str, value: object) -> None:
    """Indices and shapes must be integers: inf or NaN is a malformed plan (not an OverflowError), and
    1.7 is refused rather than silently read as 1."""
    d = {**PLAN, "ops": [dict(o) for o in PLAN["ops"]]}
    d["ops"][1][key] = value
    with pytest.raises(UsageError, match="malformed plan"):
        Plan.from_dict(d)


@pytest.mark.parametrize("field,value", [("slope", float("nan")), ("slope", float("inf")), ("slopes", [0.1, float("nan")])])
def test_non_finite_float_parameters_are_refused(field: str, value: object) -> None:
    """A NaN or infinite layer constant would compute garbage without an error: refused on load."""
    d = {**PLAN, "ops": [dict(o) for o in PLAN["ops"]]}
    d["ops"][2] = {**d["ops"][2], "params": {**d["ops"][2]["params"], field: value}}
    with pytest.raises(UsageError, match=field):
        Plan.from_dict(d)


def test_a_socket_closed_under_the_mqtt_client_is_a_warning_not_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """The broker drops the connection while paho asks the loop to watch its (closed) socket: the loop's
    add_writer raises inside a callback. A started transport logs that one error as a warning line; any
    other callback error still reaches the loop's own handler (with its traceback)."""
    import asyncio
    import logging
    import socket

    from blindseg.transport import _socket_teardown_handler

    async def main() -> list[dict]:
        loop = asyncio.get_running_loop()
        seen: list[dict] = []
        loop.set_exception_handler(lambda lp, ctx: seen.append(ctx))
        loop.set_exception_handler(_socket_teardown_handler(loop.get_exception_handler()))
        loop.set_exception_handler(_socket_teardown_handler(loop.get_exception_handler()))  # a second start
        sock = socket.socket()
        sock.close()
        loop.call_soon(loop.add_writer, sock, lambda: None)  # the race: a closed socket registered
        loop.call_soon(lambda: 1 / 0)  # anything else
        await asyncio.sleep(0.05)
        return seen

    with caplog.at_level(logging.WARNING, logger="blindseg.transport"):
        seen = asyncio.run(main())
    assert [type(c.get("exception")) for c in seen] == [ZeroDivisionError]
    assert any("closed while the client registered it" in r.getMessage() for r in caplog.records)
