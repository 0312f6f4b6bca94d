"""What a process holds, read from /proc: its listening sockets."""

from __future__ import annotations

import os
import re
import socket
import struct
from pathlib import Path


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """TCP listeners owned by ``pid`` as (address, port), read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    found: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A == LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            if table.endswith("6"):
                addr = f"ipv6:{addr_hex}"
            else:
                addr = socket.inet_ntoa(struct.pack("<I", int(addr_hex, 16)))
            found.add((addr, int(port_hex, 16)))
    return found
