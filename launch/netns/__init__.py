"""Two emulated "hosts" on one machine: network namespaces joined by a veth pair (hosts.py), shaped to a named link
profile (link.py: rate by tc tbf, loss by an iptables random drop, delay by the NFQUEUE program delay.py).
Used by `ndtrain bench network` and bench/netns_cluster.py. Needs root; nothing leaves the private namespaces."""
