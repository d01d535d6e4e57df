"""Start and stop a real ComfyUI server (CPU, 127.0.0.1 only) with node packs symlinked in.

The checkout is never modified: each server gets its own `--base-directory` (custom_nodes/, models/,
input/, output/, temp/, user/) and its own sqlite database.

    from comfyui_harness.server import start_server
    with start_server(comfy_dir, packs=[pack_dir], models_dir=models) as srv:
        srv.url, srv.log_text(), srv.import_failures(), srv.object_info

or from a shell (prints one JSON line; `stop --pid` ends it):
    python -m comfyui_harness.server start --comfy-dir DIR --pack PACK [--models-dir DIR]
    python -m comfyui_harness.server stop --pid PID

Gotchas handled here:
- the frontend's first load with an empty user dir opens the template browser on an empty graph:
  `Comfy.TutorialCompleted` is pre-seeded in user/default/comfy.settings.json;
- a pack that fails to import shows only in the log ('(IMPORT FAILED): <path>'): `import_failures()`;
- `--base-directory` replaces ComfyUI/custom_nodes (the stock example nodes are not loaded).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SETTINGS = {"Comfy.TutorialCompleted": True}


@dataclass
class ComfyServer:
    url: str
    port: int
    pid: int
    base_dir: Path
    log: Path
    startup_s: float = 0.0
    object_info: dict = field(default_factory=dict)
    proc: Optional[subprocess.Popen] = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def import_failures(self) -> list[str]:
        return sorted(set(re.findall(r"\(IMPORT FAILED\): (\S+)", self.log_text())))

    def get_json(self, path: str, timeout: float = 30):
        return get_json(self.url + path, timeout)

    def stop(self) -> None:
        stop(self.pid, self.proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def prepare_base_dir(base_dir: Path, packs, models_dir: Optional[Path] = None) -> None:
    """packs: folders (linked under their own names) or {link name: folder}."""
    for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    items = packs.items() if isinstance(packs, dict) else ((Path(p).name, p) for p in packs)
    for name, pack in items:
        pack = Path(pack).resolve()
        link = base_dir / "custom_nodes" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(pack, target_is_directory=True)
    models = base_dir / "models"
    if models_dir is not None and not models.exists():
        models.symlink_to(Path(models_dir).resolve(), target_is_directory=True)
    models.mkdir(exist_ok=True)
    settings = base_dir / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps(SETTINGS))


def start(comfy_dir, packs=(), base_dir=None, models_dir=None, port: int = 0, python: Optional[str] = None,
          timeout: float = 240.0, extra_args=(), env: Optional[dict] = None) -> ComfyServer:
    """Start `main.py --cpu` and wait for /object_info. Raises RuntimeError (log tail) on failure."""
    comfy_dir = Path(comfy_dir).resolve()
    if base_dir is None:
        # a folder of our own: removed when the test process ends (its log is still readable until then)
        base_dir = Path(tempfile.mkdtemp(prefix="comfy_base_"))
        atexit.register(shutil.rmtree, base_dir, True)
    base_dir = Path(base_dir).resolve()
    prepare_base_dir(base_dir, packs, models_dir)
    port = port or free_port()
    log_path = base_dir / "server.log"
    cmd = [python or sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base_dir), "--database-url", f"sqlite:///{base_dir}/comfyui.db",
           *extra_args]
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    srv = ComfyServer(url=f"http://127.0.0.1:{port}", port=port, pid=proc.pid, base_dir=base_dir, log=log_path,
                      proc=proc)
    error = None
    while True:
        if proc.poll() is not None:
            error = f"ComfyUI exited with code {proc.returncode}"
            break
        if time.time() - t0 > timeout:
            error = f"no /object_info after {timeout:.0f} s"
            break
        try:
            srv.object_info = srv.get_json("/object_info", timeout=20)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    srv.startup_s = round(time.time() - t0, 2)
    if error:
        srv.stop()
        raise RuntimeError(f"{error}; command {' '.join(cmd)}; log tail:\n{srv.log_text()[-4000:]}")
    return srv


@contextlib.contextmanager
def start_server(comfy_dir, **kw):
    srv = start(comfy_dir, **kw)
    try:
        yield srv
    finally:
        srv.stop()


def stop(pid: int, proc: Optional[subprocess.Popen] = None, grace: float = 10.0) -> None:
    """SIGTERM the server's process group (it was started in its own session), SIGKILL after `grace` s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    t0 = time.time()
    while time.time() - t0 < grace:
        if proc is not None:
            if proc.poll() is not None:
                return
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=10)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("--comfy-dir", default=os.environ.get("COMFYUI_DIR"), required=not os.environ.get("COMFYUI_DIR"))
    s.add_argument("--pack", action="append", default=[])
    s.add_argument("--models-dir")
    s.add_argument("--base-dir")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--timeout", type=float, default=240)
    t = sub.add_parser("stop")
    t.add_argument("--pid", type=int, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "stop":
        stop(a.pid)
        return 0
    try:
        # the server outlives this command, so its folder must too (start() removes only its own at exit)
        base_dir = a.base_dir or tempfile.mkdtemp(prefix="comfy_base_")
        srv = start(a.comfy_dir, a.pack, base_dir, a.models_dir, a.port, timeout=a.timeout)
    except RuntimeError as e:
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    print(json.dumps({"ok": True, "url": srv.url, "pid": srv.pid, "base_dir": str(srv.base_dir),
                      "log": str(srv.log), "startup_s": srv.startup_s, "import_failed": srv.import_failures(),
                      "node_count": len(srv.object_info)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
