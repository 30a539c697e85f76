"""``python tests/demo/guarded_demo.py ARGS``: ``vtc demo ARGS`` with every connection or name lookup beyond this
machine refused and written to the file named by $VTC_DEMO_NETLOG (one line each), so a test can prove the demo
stays offline."""

from __future__ import annotations

import os
import socket
import sys

LOCAL = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "::", ""}
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo


def _record(what: str) -> None:
    with open(os.environ["VTC_DEMO_NETLOG"], "a") as log:
        log.write(what + "\n")


def _local(host) -> bool:
    return str(host) in LOCAL or str(host).startswith("127.")


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _record(f"connect {address[0]}:{address[1]}")
        raise OSError(f"vtc demo test: outside connection to {address[0]} refused")
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _record(f"connect {address[0]}:{address[1]}")
        return 111  # ECONNREFUSED
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _local(host.decode() if isinstance(host, bytes) else host):
        _record(f"lookup {host}")
        raise socket.gaierror(socket.EAI_NONAME, f"vtc demo test: lookup of {host} refused")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.getaddrinfo = getaddrinfo

if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    from vtc.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
