"""The server owner's security level for shared workflows (docs/security.md).

A workflow from someone else can type any folder into `model_path` / `head_path` and any hub id (a
multi-gigabyte download on the server, or a probe of which paths exist on a server others can reach).
Following ComfyUI-Manager's convention (`security_level` in its config.ini: strong / normal / ...),
the pack has a level the server owner sets, never a workflow:

- `normal` (default): free-path inputs and hub downloads work;
- `strong`: the free-path inputs are refused (whatever they name, with one message that does not say
  whether the path exists) and nothing is downloaded from the hub; the dropdowns, which only reach
  inside ComfyUI's models folders, keep working.

Set by the environment variable `QWEN_IDENTITY_SECURITY_LEVEL`, else by `qwen_identity.ini` next to
the pack (`[security]` / `level = strong`). An unreadable or unparsable file fails closed (`strong`).
Read on every check, so a change applies without restarting ComfyUI.
"""

from __future__ import annotations

import configparser
import logging
import os
from pathlib import Path

from ..errors import UserInputError

ENV = "QWEN_IDENTITY_SECURITY_LEVEL"
CONFIG_FILE = Path(__file__).resolve().parents[2] / "qwen_identity.ini"
LEVELS = ("normal", "strong")
_log = logging.getLogger("qwen_identity")


def security_level() -> str:
    """`normal` or `strong` (see the module docstring)."""
    value = os.environ.get(ENV, "").strip().lower()
    source = f"${ENV}"
    if not value and CONFIG_FILE.is_file():
        parser = configparser.ConfigParser()
        try:
            parser.read(CONFIG_FILE, encoding="utf-8")
            value = parser.get("security", "level", fallback="").strip().lower()
        except (configparser.Error, OSError, UnicodeDecodeError) as e:
            _log.warning("qwen_identity: cannot read %s (%s); using security level strong", CONFIG_FILE, e)
            return "strong"
        source = str(CONFIG_FILE)
    if not value:
        return "normal"
    if value not in LEVELS:
        raise UserInputError(f"security level {value!r} (from {source}) is not known: use normal or strong.")
    return value


def free_paths_allowed() -> bool:
    return security_level() != "strong"


def downloads_allowed() -> bool:
    return security_level() != "strong"


def check_free_path(value: str, input_name: str, instead: str) -> None:
    """Refuse a non-empty free-path input at level strong. The message is the same for every value: it
    names only the input, never the value, and does not depend on whether the path exists."""
    if (value or "").strip() and not free_paths_allowed():
        raise UserInputError(f"{input_name} is turned off on this server (security level strong, set by its owner): "
                             f"leave it empty and choose {instead}.")


def check_download(what: str) -> None:
    if not downloads_allowed():
        raise UserInputError(f"hub downloads are turned off on this server (security level strong): put the {what} "
                             "folder into the models folder and choose it by name.")
