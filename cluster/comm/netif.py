"""Network interfaces by name: which exist here, and the IPv4 address of one (what a listener binds when the user
names the cluster interface with --iface / cluster.iface)."""
from __future__ import annotations

import socket
import struct

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_names() -> list[str]:
    return [name for _, name in socket.if_nameindex()]


def interface_address(name: str) -> str:
    """The IPv4 address of interface `name` on this host; ValueError naming it when it has none or is unknown."""
    if name not in interface_names():
        raise ValueError(f"network interface {name!r} does not exist on {socket.gethostname()} "
                         f"(interfaces: {', '.join(interface_names())})")
    import fcntl  # POSIX only: interface_names() works without it
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
    except OSError:
        raise ValueError(f"network interface {name!r} on {socket.gethostname()} has no IPv4 address") from None
    finally:
        s.close()
    return socket.inet_ntoa(packed[20:24])
