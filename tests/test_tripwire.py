"""The network tripwire trips, in this process and in subprocesses; loopback stays usable."""

import socket
import subprocess
import sys
import urllib.request

import netguard_core
import pytest


@pytest.fixture
def expect_blocked():
    before = len(netguard_core.ATTEMPTS)
    yield
    assert len(netguard_core.ATTEMPTS) > before, "the tripwire did not record the attempt"
    del netguard_core.ATTEMPTS[before:]  # these attempts were deliberate


def test_dns_lookup_is_blocked(expect_blocked):
    with pytest.raises(netguard_core.NetworkBlockedError):
        socket.getaddrinfo("huggingface.co", 443)


def test_connect_to_public_ip_is_blocked(expect_blocked):
    with socket.socket() as s, pytest.raises(netguard_core.NetworkBlockedError):
        s.connect(("1.1.1.1", 443))


def test_urllib_is_blocked(expect_blocked):
    with pytest.raises(OSError):
        urllib.request.urlopen("https://huggingface.co/api/models/Qwen/Qwen-Image", timeout=5)


def test_loopback_is_allowed():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def test_subprocesses_get_the_tripwire(cli_env):
    code = "import socket\ntry:\n    socket.getaddrinfo('pypi.org', 443)\nexcept OSError as e:\n    print('BLOCKED', e)\n"
    out = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True, text=True, timeout=60)
    assert "BLOCKED" in out.stdout and "netguard" in out.stdout
