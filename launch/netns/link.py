"""Named link profiles and the commands that shape the veth between two namespaces to one of them. This kernel
has no netem, so the link is built from what it has, per direction (each host shapes what it sends and what it
receives):
  rate   tc tbf on the sending end (a token bucket of `rate_mbit`, ~1 ms of burst, a 20 ms queue);
  loss   iptables `-m statistic --mode random --probability p -j DROP` on the receiving side (INPUT);
  delay  iptables `-j NFQUEUE` after the loss rule, and delay.py holding each queued packet for the one-way delay.
The round-trip time is then 2 x delay_ms (+ the program's wake-up latency). With loss, segmentation offload is
switched off on both ends (ethtool), so a drop takes one MTU-sized packet, not a 64 KB GSO burst; without loss it
stays on, so the delay program sees few, large packets (1 Gbit/s of 1500-byte packets is too many for Python).
"""
from __future__ import annotations

import select
import subprocess
import sys
from dataclasses import dataclass

from .hosts import TwoHosts, sh


@dataclass(frozen=True)
class LinkProfile:
    """rate_mbit: bottleneck rate each way (None: unshaped veth); delay_ms: one-way delay each way; loss: the
    probability that a packet is dropped, each way."""
    name: str
    rate_mbit: float | None
    delay_ms: float
    loss: float

    def __post_init__(self):
        if self.rate_mbit is not None and not self.rate_mbit > 0:
            raise ValueError(f"profile {self.name}: rate_mbit must be > 0 (got {self.rate_mbit})")
        if not 0 <= self.delay_ms <= 10_000:
            raise ValueError(f"profile {self.name}: delay_ms must be in [0, 10000] (got {self.delay_ms})")
        if not 0 <= self.loss < 1:
            raise ValueError(f"profile {self.name}: loss must be in [0, 1) (got {self.loss})")

    @property
    def rtt_ms(self) -> float:
        return 2 * self.delay_ms

    @property
    def bdp_bytes(self) -> int:
        """Bandwidth-delay product of the round trip (what must be in flight to fill the link)."""
        return 0 if self.rate_mbit is None else int(self.rate_mbit * 1e6 / 8 * self.rtt_ms / 1e3)


PROFILES = {p.name: p for p in (
    LinkProfile("none", None, 0.0, 0.0),
    LinkProfile("lan", 1000.0, 0.2, 0.0),
    LinkProfile("wifi-good", 200.0, 3.0, 0.001),
    LinkProfile("wifi-poor", 50.0, 10.0, 0.01),
)}


def tbf_burst_bytes(rate_mbit: float) -> int:
    """~1 ms of data at the rate, at least 4 full-size packets (tbf needs burst >= MTU; more smooths timer jitter)."""
    return max(6000, int(rate_mbit * 1e6 / 8 * 1e-3))


def shaping_commands(net: TwoHosts, host: str, profile: LinkProfile, queue: int) -> list[list[str]]:
    """The commands (each run inside host's namespace) that shape what host sends (rate) and receives (loss,
    delay via NFQUEUE `queue`; the delay program itself is delay_command)."""
    d = net.dev(host)
    cmds = []
    if profile.loss > 0:
        cmds.append(["ethtool", "-K", d, "tso", "off", "gso", "off", "gro", "off"])
    if profile.rate_mbit is not None:
        cmds.append(["tc", "qdisc", "replace", "dev", d, "root", "tbf", "rate", f"{profile.rate_mbit:g}mbit",
                     "burst", str(tbf_burst_bytes(profile.rate_mbit)), "latency", "20ms"])
    if profile.loss > 0:
        cmds.append(["iptables", "-w", "-A", "INPUT", "-i", d, "-m", "statistic", "--mode", "random",
                     "--probability", f"{profile.loss:g}", "-j", "DROP"])
    if profile.delay_ms > 0:
        # --queue-bypass: should the program be gone, packets pass undelayed rather than vanish
        cmds.append(["iptables", "-w", "-A", "INPUT", "-i", d, "-j", "NFQUEUE", "--queue-num", str(queue),
                     "--queue-bypass"])
    return [net.exec_ns(host, *c) for c in cmds]


def delay_command(net: TwoHosts, host: str, profile: LinkProfile, queue: int, python: str = sys.executable) -> list[str]:
    return net.exec_ns(host, python, "-m", "ndtrain.launch.netns.delay", "--queue", str(queue),
                       "--delay-ms", f"{profile.delay_ms:g}")


def shape(net: TwoHosts, profile: LinkProfile, python: str = sys.executable, timeout: float = 20.0) -> None:
    """Apply profile to both directions of net's link: tc/iptables in each namespace, and one delay program per
    namespace (registered in net.procs, so net.teardown stops it). Raises RuntimeError naming the failing command."""
    for i, host in enumerate(net.HOSTS):
        for cmd in shaping_commands(net, host, profile, queue=i):
            r = sh(*cmd, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"link {profile.name}: `{' '.join(cmd)}` failed: {r.stderr.strip()}")
        if profile.delay_ms > 0:
            p = subprocess.Popen(delay_command(net, host, profile, i, python), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            net.procs.append(p)
            line = _readline(p, timeout)
            if line.strip() != "ready":
                p.kill()
                err = p.stderr.read() if p.poll() is not None else ""
                raise RuntimeError(f"link {profile.name}: the delay program in {net.ns(host)} did not start "
                                   f"({line.strip() or 'no output'}; {err.strip()[-300:]})")


def _readline(p: subprocess.Popen, timeout: float) -> str:
    r, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline() if r else ""
