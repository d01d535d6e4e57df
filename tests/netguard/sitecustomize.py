"""Network tripwire for test subprocesses: put this folder on PYTHONPATH.

Any DNS lookup or connection to a non-loopback address raises and is logged to stderr, so a test
that reaches for the network fails loudly. Loopback stays open (a local ComfyUI server).
"""
import sys

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # the tests folder, so `netguard_core` imports
from netguard_core import install  # noqa: E402

install()
