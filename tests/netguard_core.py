"""The network tripwire shared by the test session (conftest) and its subprocesses (sitecustomize)."""

from __future__ import annotations

import ipaddress
import socket
import sys

ATTEMPTS: list[str] = []
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class NetworkBlockedError(OSError):
    """Raised for any network access the tests did not ask for."""


def _is_loopback(host) -> bool:
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _deny(kind: str, what) -> None:
    msg = f"netguard: network access blocked during tests ({kind} {what!r})"
    ATTEMPTS.append(msg)
    sys.stderr.write(msg + "\n")
    raise NetworkBlockedError(msg)


def install() -> None:
    if getattr(socket, "_qwen_identity_netguard", False):
        return
    orig_getaddrinfo, orig_connect, orig_connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            _deny("getaddrinfo", host)
        return orig_getaddrinfo(host, *args, **kwargs)

    def _check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0] if isinstance(address, tuple) else address
            if not _is_loopback(host):
                _deny("connect", address)

    def connect(self, address):
        _check(self, address)
        return orig_connect(self, address)

    def connect_ex(self, address):
        _check(self, address)
        return orig_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket._qwen_identity_netguard = True
