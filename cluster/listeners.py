"""Which TCP ports a process tree listens on, and on which addresses (read from /proc, Linux only).

Used by the tests that hold Ray and the service to loopback, and by the abuse benchmark's
listening-socket table:

    python -m cluster.listeners PID...      # one row per listening socket of each PID's tree
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket: bound address, port, and the process holding it."""

    address: str
    port: int
    pid: int
    name: str

    @property
    def loopback(self) -> bool:
        ip = ipaddress.ip_address(self.address)
        return (ip.ipv4_mapped or ip).is_loopback if isinstance(ip, ipaddress.IPv6Address) else ip.is_loopback


def _parents() -> dict[int, int]:
    out = {}
    for d in PROC.iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            out[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def process_tree(roots: list[int]) -> set[int]:
    """`roots` and every live descendant of them."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def _hex_address(field: str) -> tuple[str, int]:
    addr, port = field.split(":")
    raw = bytes.fromhex(addr)
    # /proc/net/tcp{,6} print each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}", int(port, 16)
    return str(ip), int(port, 16)


def _listening_inodes() -> dict[str, tuple[str, int]]:
    out = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A":  # TCP_LISTEN
                out[f[9]] = _hex_address(f[1])
    return out


def listeners(pids: set[int] | list[int]) -> list[Listener]:
    """Every listening TCP socket held by one of `pids` (sorted by port)."""
    inodes = _listening_inodes()
    found = {}
    for pid in pids:
        fd_dir = PROC / str(pid) / "fd"
        try:
            name = (PROC / str(pid) / "comm").read_text().strip()
            fds = list(fd_dir.iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = target[8:-1]
                if inode in inodes:
                    addr, port = inodes[inode]
                    found[(addr, port)] = Listener(addr, port, pid, name)
    return sorted(found.values(), key=lambda s: (s.port, s.address))


def tree_listeners(roots: list[int]) -> list[Listener]:
    """Listening sockets of `roots` and all their descendants."""
    return listeners(process_tree(roots))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Listening TCP sockets of process trees")
    ap.add_argument("pids", type=int, nargs="+")
    args = ap.parse_args(argv)
    rows = tree_listeners(args.pids)
    sys.stdout.write("| address | port | process | loopback |\n|---|---|---|---|\n")
    for s in rows:
        sys.stdout.write(f"| {s.address} | {s.port} | {s.name} | {'yes' if s.loopback else 'NO'} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
