"""Real links for netsim's checks: a network namespace per party, joined to this one by a veth pair
whose two ends are shaped by the kernel's token bucket (``tc qdisc ... tbf``).

This kernel has no ``sch_netem``, so a link's latency is played by a delaying relay in user space
(:class:`netsim.relay.ShapedRelay` with bandwidth 0) listening on this namespace's end of the veth;
its bandwidth is the kernel's, queueing included. Needs root and ``ip``/``tc``
(:func:`unavailable` says why not); every namespace and veth made here is removed on
:meth:`NamespaceLink.down`, also after a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess


def _run(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if p.returncode:
        raise OSError(f"{' '.join(cmd)}: {p.stderr.strip() or p.returncode}")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``/``tc``, no netns support), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the ip and tc commands (iproute2) are not installed"
    probe = f"bsprobe{secrets.token_hex(3)}"
    try:
        _run("ip", "netns", "add", probe)
    except OSError as e:
        return f"cannot create a network namespace ({e})"
    _run("ip", "netns", "del", probe)
    return None


class NamespaceLink:
    """Namespace ``name`` and a veth pair to it: this side ``host_ip``, the namespace's ``ns_ip``
    (10.201.<index>.0/30). :meth:`shape` sets both ends' egress rate (0: unshaped)."""

    def __init__(self, index: int) -> None:
        tag = secrets.token_hex(3)
        self.name, self.index = f"bs{tag}n{index}", index
        self._host_dev, self._ns_dev = f"bs{tag}h{index}", f"bs{tag}p{index}"
        self.host_ip, self.ns_ip = f"10.201.{index}.1", f"10.201.{index}.2"
        self._up = False

    def prefix(self) -> list[str]:
        """The command prefix that runs a process inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def up(self) -> NamespaceLink:
        try:
            _run("ip", "netns", "add", self.name)
            self._up = True
            _run("ip", "link", "add", self._host_dev, "type", "veth", "peer", "name", self._ns_dev)
            _run("ip", "link", "set", self._ns_dev, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self._host_dev)
            _run("ip", "link", "set", self._host_dev, "up")
            for cmd in (("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self._ns_dev),
                        ("ip", "link", "set", self._ns_dev, "up"), ("ip", "link", "set", "lo", "up")):
                _run(*self.prefix(), *cmd)
        except OSError:
            self.down()
            raise
        return self

    @staticmethod
    def burst(bandwidth: float) -> int:
        """The token bucket's depth (bytes) at ``bandwidth``: one 4 ms kernel tick's worth, at least 32 KiB
        (shallower buckets do not hold the rate). A frame up to this size after an idle moment passes
        unpaced; the prediction counts that (:attr:`netsim.Profile.burst`)."""
        return max(32 << 10, int(bandwidth / 8 / 250))

    def shape(self, bandwidth: float) -> None:
        """Both ends' egress at ``bandwidth`` bit/s through tbf (a queue deep enough never to drop
        what one frame window puts in flight); 0 removes the shaping."""
        for pre, dev in (([], self._host_dev), (self.prefix(), self._ns_dev)):
            subprocess.run([*pre, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=30)
            if bandwidth > 0:
                burst = self.burst(bandwidth)
                _run(*pre, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(bandwidth)}bit",
                     "burst", str(burst), "limit", str(16 << 20))

    def down(self) -> None:
        if self._up:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)  # takes the veth too
            subprocess.run(["ip", "link", "del", self._host_dev], capture_output=True, timeout=30)
            self._up = False

    def __enter__(self) -> NamespaceLink:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()
