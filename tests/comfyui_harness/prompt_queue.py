"""Queue an API-format workflow on a running ComfyUI (POST /prompt) and wait on /history.

    from comfyui_harness.prompt_queue import load_api_workflow, queue_prompt
    result = queue_prompt(url, load_api_workflow(path), timeout=300)
    result.ok, result.stage, result.error_message(), result.images()

Result stages: "done" (status success), "validation" (HTTP 400 from /prompt: `error.type` is
invalid_prompt | prompt_outputs_failed_validation | ..., with `node_errors`), "execution"
(`execution_error` in /history: node_id, node_type, exception_type, exception_message), "timeout"
(the prompt is interrupted and removed from the queue).

Identical re-queues are answered from ComfyUI's cache (`execution_cached`), so tests that need a real
run change a seed or use a fresh server.
Standard library only; polls /history (no websocket).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class QueueResult:
    stage: str                       # done | validation | execution | timeout
    seconds: float
    prompt_id: Optional[str] = None
    http_status: Optional[int] = None
    body: dict = field(default_factory=dict)         # /prompt answer (validation) or /history entry
    outputs: dict = field(default_factory=dict)
    execution_error: Optional[dict] = None

    @property
    def ok(self) -> bool:
        return self.stage == "done"

    def error_message(self) -> str:
        """Everything a user would read about the failure, as one string."""
        if self.stage == "validation":
            parts = [json.dumps(self.body.get("error", {}))]
            for nid, ne in (self.body.get("node_errors") or {}).items():
                for err in ne.get("errors", []):
                    parts.append(f"node {nid} ({ne.get('class_type')}): {err.get('message')}: {err.get('details')}")
            return "\n".join(parts)
        if self.stage == "execution" and self.execution_error:
            e = self.execution_error
            return f"node {e.get('node_id')} ({e.get('node_type')}): {e.get('exception_type')}: {e.get('exception_message')}"
        return self.stage

    def images(self) -> list[dict]:
        return [img for out in self.outputs.values() for img in out.get("images", [])]

    def summary(self) -> str:
        return json.dumps({"stage": self.stage, "error": self.error_message() if not self.ok else None,
                           "outputs": self.outputs}, default=str)[:4000]


def load_api_workflow(path) -> dict:
    """An API-format workflow ({id: {class_type, inputs}}); refuses UI-format files."""
    wf = json.loads(Path(path).read_text())
    if isinstance(wf, dict) and isinstance(wf.get("prompt"), dict):
        wf = wf["prompt"]
    if isinstance(wf, dict) and "nodes" in wf and "links" in wf:
        raise ValueError(f"{path} is a UI-format workflow (nodes/links); /prompt takes the API-format twin")
    return wf


def _request(url: str, data=None, timeout: float = 30):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def history_entry(url: str, prompt_id: str) -> Optional[dict]:
    return _request(f"{url}/history/{prompt_id}").get(prompt_id)


def wait_for(url: str, prompt_id: str, t0: float, timeout: float, poll: float = 0.25) -> QueueResult:
    while time.time() - t0 < timeout:
        h = history_entry(url, prompt_id)
        if h:
            status = h.get("status", {})
            res = QueueResult(stage="done", seconds=round(time.time() - t0, 2), prompt_id=prompt_id, body=h,
                              outputs=h.get("outputs", {}))
            if status.get("status_str") != "success":
                res.stage = "execution"
                res.execution_error = next((m[1] for m in status.get("messages", []) if m[0] == "execution_error"), {})
            return res
        time.sleep(poll)
    try:
        _request(url + "/interrupt", {"prompt_id": prompt_id})
        _request(url + "/queue", {"delete": [prompt_id]})
    except Exception:  # noqa: BLE001 - best effort
        pass
    return QueueResult(stage="timeout", seconds=round(time.time() - t0, 2), prompt_id=prompt_id)


def queue_prompt(url: str, workflow: dict, timeout: float = 600.0) -> QueueResult:
    url = url.rstrip("/")
    t0 = time.time()
    try:
        resp = _request(url + "/prompt", {"prompt": workflow, "client_id": str(uuid.uuid4())})
    except urllib.error.HTTPError as e:
        raw = e.read().decode(errors="replace")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            body = {"error": {"message": raw}}
        return QueueResult(stage="validation", seconds=round(time.time() - t0, 2), http_status=e.code, body=body)
    return wait_for(url, resp["prompt_id"], t0, timeout)


def download_image(url: str, image: dict, dest: Path) -> Path:
    """Fetch one output image (an entry of `QueueResult.images()`) through /view."""
    q = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
    dest = Path(dest) / image["filename"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    urllib.request.urlretrieve(f"{url.rstrip('/')}/view?{q}", dest)
    return dest
