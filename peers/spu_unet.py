"""SecretFlow SPU 0.9.5 on blindseg's reference U-Net: SEMI2K over FM64, two processes, brpc on loopback.

Run in SPU's own venv (``make peers``): ``python peers/spu_unet.py WEIGHTS.npz IMAGE.npy``. Prints one
JSON object: online seconds of the second of two runs of the compiled program (the first warms up),
bytes and send actions per party of that run (SPU's link statistics, from its pphlo profile log), and
pixel agreement of the argmax with a float32 numpy/jax forward of the same weights.

The parent compiles the jax forward (``unet_forward.py``, the same network every system runs) and
secret-shares the image and the weights with SPU's own Io (SEMI2K's dealer is its trusted first
party, as CrypTen's TFP); each party runs in its own forked process with its own brpc link.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import spu
import spu.libspu as libspu
import spu.utils.frontend as spu_fe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet_forward import forward  # noqa: E402

_DN = ("NCHW", "OIHW", "NCHW")


def jax_ops() -> dict:
    def conv(x: Any, w: Any, b: Any, p: int) -> Any:
        y = jax.lax.conv_general_dilated(x, w, (1, 1), [(p, p), (p, p)], dimension_numbers=_DN)
        return y + b.reshape(1, -1, 1, 1)

    def up(x: Any, w: Any, b: Any) -> Any:  # torch ConvTranspose2d k2 s2: weight (Cin, Cout, 2, 2)
        n, _, h, wd = x.shape
        y = jnp.einsum("nchw,cokl->nohkwl", x, w).reshape(n, w.shape[1], 2 * h, 2 * wd)
        return y + b.reshape(1, -1, 1, 1)

    def pool(x: Any) -> Any:
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    return {"conv": conv, "relu": jax.nn.relu, "pool": pool, "up": up, "cat": lambda a, b: jnp.concatenate([a, b], 1)}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _party(rank: int, ports: list[int], config: bytes, program: bytes, params: list[tuple[bytes, list[bytes]]],
           conn: Any) -> None:
    import os
    import tempfile

    log = tempfile.NamedTemporaryFile("w+", prefix=f"spu-party{rank}-", suffix=".log")
    for fd in (1, 2):  # SPU's C++ log (its profile summary carries the link statistics)
        os.dup2(log.fileno(), fd)
    executable = libspu.Executable()
    executable.ParseFromString(program)
    desc = libspu.link.Desc()
    desc.recv_timeout_ms = 600_000
    for r, port in enumerate(ports):
        desc.add_party(f"P{r}", f"127.0.0.1:{port}")
    lctx = libspu.link.create_brpc(desc, rank)
    conf = libspu.RuntimeConfig()
    conf.ParseFromString(config)
    rt = spu.Runtime(lctx, conf)
    for name, (meta, chunks) in zip(executable.input_names, params, strict=True):
        share = libspu.Share()
        share.meta, share.share_chunks = meta, chunks
        rt.set_var(name, share)
    times = []
    for _ in range(2):
        lctx.barrier()
        t = time.perf_counter()
        rt.run(executable)
        times.append(time.perf_counter() - t)
    out = rt.get_var(executable.output_names[0])
    sys.stdout.flush()
    sys.stderr.flush()
    log.seek(0)
    conn.send((times, link_stats(log.read()), out.meta, list(out.share_chunks)))
    conn.close()


def main() -> None:
    weights = {k: v.astype(np.float32) for k, v in np.load(sys.argv[1]).items()}
    image = np.load(sys.argv[2]).astype(np.float32)
    names = sorted(weights)
    ops = jax_ops()

    def fn(x: Any, *ws: Any) -> Any:
        return forward(x, dict(zip(names, ws, strict=True)), ops)

    config = spu.RuntimeConfig(protocol=spu.ProtocolKind.SEMI2K, field=spu.FieldType.FM64)
    config.enable_pphlo_profile = True  # its summary log carries the link's send bytes / actions
    args = [image] + [weights[k] for k in names]
    in_names = [f"in{i}" for i in range(len(args))]
    executable, _ = spu_fe.compile(spu_fe.Kind.JAX, fn, args, {}, in_names,
                                   [spu.Visibility.VIS_SECRET] * len(args), lambda out: ["out0"])
    io = spu.Io(2, config)
    shares = [io.make_shares(a, spu.Visibility.VIS_SECRET) for a in args]
    ports = _free_ports(2)
    ctx = mp.get_context("spawn")  # jax is multithreaded: never fork it
    pipes = [ctx.Pipe(duplex=False) for _ in range(2)]
    procs = [ctx.Process(target=_party, args=(r, ports, config.SerializeToString(), executable.SerializeToString(),
                                              [(sh[r].meta, list(sh[r].share_chunks)) for sh in shares], pipes[r][1]))
             for r in range(2)]
    for p in procs:
        p.start()
    results = [pipes[r][0].recv() for r in range(2)]
    for p in procs:
        p.join(timeout=60)
    outs = []
    for _, _, meta, chunks in results:
        out = libspu.Share()
        out.meta, out.share_chunks = meta, chunks
        outs.append(out)
    logits = io.reconstruct(outs)
    plain = np.asarray(jax.jit(fn)(*args))
    agree = float((logits.argmax(1) == plain.argmax(1)).mean())
    stats = results[0][1]
    print(json.dumps({"system": f"SPU {spu.version.__version__} SEMI2K FM64",
                      "online_seconds": max(r[0][1] for r in results), "first_run_seconds": max(r[0][0] for r in results),
                      "bytes_per_party": stats.get("bytes"), "send_actions": stats.get("actions"),
                      "pixel_agreement": agree}))


def link_stats(log: str) -> dict[str, int]:
    """Send bytes / actions of the last run, from SPU's profile summary ("Link details") lines."""
    found = re.findall(r"Link details: total send bytes (\d+), recv bytes \d+, send actions (\d+)", log)
    return {"bytes": int(found[-1][0]), "actions": int(found[-1][1])} if found else {}


if __name__ == "__main__":
    main()
