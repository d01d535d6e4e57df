"""Drive ComfyUI's frontend in headless Chromium: load a UI workflow, report missing nodes, queue it.

    from comfyui_harness.browser import Frontend
    with Frontend(url, chromium="/usr/bin/chromium") as fe:
        report = fe.load_workflow(path, via="drop", queue=True, screenshot=tmp / "wf.png")
        report["missing_node_types"], report["missing_dialog"], report["run_status"]

Needs the Playwright *Python package* (its bundled driver) and a system Chromium
(`apt-get install -y chromium`); never `playwright install`.

How missing nodes are seen (frontend 1.27.x and 1.49.x): an extension registered before loading records the
`missingNodeTypes` argument of the `afterConfigureGraph` hook (the list the "Some Nodes Are Missing"
dialog shows); the dialog itself (`.comfy-missing-nodes`) is checked too. Loading `via="drop"`
dispatches dragenter/dragover/drop with a File on the canvas, as a user's drag-and-drop does;
`via="api"` calls `app.loadGraphData`. Queueing calls `app.queuePrompt(0, 1)` (the Run button's code
path), captures the POST /prompt answer and polls /history.
Baseline noise on an offline server (not failures): with frontend 1.27.10 the page error "Cannot
read properties of undefined (reading 'id')", 404s for user.css / userdata / comfy.templates.json,
net::ERR_NAME_NOT_RESOLVED for api.comfy.org; with 1.49.6 also "ComfyApp graph accessed before
initialization" at start-up. `BASELINE_NOISE` lists them.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Optional

CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               # offline: every host but the local server resolves to nothing (the frontend asks api.comfy.org)
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
BASELINE_NOISE = ("reading 'id'", "user.css", "/userdata", "comfy.templates.json", "ERR_NAME_NOT_RESOLVED",
                  "api.comfy.org", "Failed to load resource",
                  # frontend 1.49.x (ComfyUI 0.33): logged at every start-up, also with no custom node installed
                  "ComfyApp graph accessed before initialization")

# The page is ready for a user once the app has its graph and the start-up loading mask is gone. Frontend
# 1.49 sets `vueAppReady` in the same moment it raises that full-screen mask (PrimeVue BlockUI) and lowers it
# only after restoring the workflow tabs; a file dropped before the mask's leave animation ended re-raises it
# and the frontend then removes one mask twice (`NotFoundError: Failed to execute 'removeChild' on 'Node'`
# from BlockUI.removeMask), a race a person's drop never meets. 1.27 has `app.graph` and no such mask.
READY_JS = """() => window.app && window.app.vueAppReady
  && ('isGraphReady' in window.app ? window.app.isGraphReady : !!window.app.graph)
  && !document.querySelector('.p-blockui-mask-document')"""

HOOK_JS = """() => {
  window.__qi = {missing: null};
  app.registerExtension({name: 'qwen_identity.tests.missingNodes',
    async afterConfigureGraph(missing) { window.__qi.missing = (missing || []).map(
      m => typeof m === 'string' ? m : (m.type + (m.hint ? ' ' + m.hint : ''))); }});
}"""

DROP_JS = """async ([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: 'application/json'}));
  const el = document.querySelector('#graph-canvas');
  for (const t of ['dragenter', 'dragover', 'drop'])
    el.dispatchEvent(new DragEvent(t, {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""

DIALOG_JS = """() => {
  const vis = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const dialogs = [...document.querySelectorAll('.p-dialog')].filter(vis).map(d => d.innerText.slice(0, 300));
  const toasts = [...document.querySelectorAll('.p-toast-message')].map(t => t.innerText.slice(0, 300));
  return {dialogs, toasts,
          schema_alert: toasts.some(t => t.includes('Invalid workflow against zod schema')),
          missing_dialog: dialogs.some(d => d.includes('Some Nodes Are Missing'))
                          || document.querySelector('.comfy-missing-nodes') !== null};
}"""


EDIT_JS = """(edits) => {
  let n = 0;
  for (const node of app.graph._nodes) {
    for (const [name, value] of Object.entries(edits[node.type] || {})) {
      const w = (node.widgets || []).find(w => w.name === name);
      if (w) { w.value = value; w.callback?.(value); n++; }
    }
  }
  app.graph.setDirtyCanvas(true, true);
  return n;
}"""


def is_noise(message: str) -> bool:
    return any(n in message for n in BASELINE_NOISE)


class Frontend:
    """One headless Chromium for several checks; every check opens a fresh page."""

    def __init__(self, url: str, chromium: str, timeout_s: float = 120):
        self.url = url.rstrip("/")
        self.chromium = chromium
        self.timeout_ms = timeout_s * 1000

    def __enter__(self):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=self.chromium, headless=True, args=CHROME_ARGS)
        return self

    def __exit__(self, *exc):
        self._browser.close()
        self._pw.stop()

    def _open(self, rep: dict):
        page = self._browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("pageerror", lambda e: rep["page_errors"].append(str(e)[:300]))
        page.on("console", lambda m: m.type == "error" and rep["console_errors"].append(m.text[:300]))
        page.on("response", lambda r: r.status >= 400 and rep["failed_requests"].append(f"{r.status} {r.url}"))
        t0 = time.time()
        page.goto(self.url, wait_until="domcontentloaded", timeout=self.timeout_ms)
        page.wait_for_selector("canvas#graph-canvas", timeout=self.timeout_ms)
        page.wait_for_function(READY_JS, timeout=self.timeout_ms)
        page.wait_for_timeout(300)   # still ready a moment later: the start-up mask was not about to rise
        page.wait_for_function(READY_JS, timeout=self.timeout_ms)
        rep["frontend_version"] = page.evaluate("window.__COMFYUI_FRONTEND_VERSION__")
        rep["ui_ready_s"] = round(time.time() - t0, 2)
        return page

    def load_workflow(self, path, via: str = "drop", queue: bool = False, screenshot: Optional[Path] = None,
                      export_api: bool = False, edits: Optional[dict] = None) -> dict:
        """Load a UI workflow; optionally export the frontend's API prompt (`exported_api`), change widget
        values like a user would ({node type: {widget: value}}) and queue it from the page."""
        path = Path(path)
        rep = {"workflow": path.name, "page_errors": [], "console_errors": [], "failed_requests": []}
        page = self._open(rep)
        try:
            page.evaluate(HOOK_JS)
            if via == "drop":
                page.evaluate("app.graph.clear()")
                page.evaluate(DROP_JS, [base64.b64encode(path.read_bytes()).decode(), path.name])
            else:
                page.evaluate("wf => app.loadGraphData(wf)", json.loads(path.read_text()))
            page.wait_for_function("window.__qi.missing !== null || document.querySelector('.comfy-missing-nodes')",
                                   timeout=self.timeout_ms)
            page.wait_for_timeout(1000)  # let dialogs/toasts and the canvas settle
            rep.update(page.evaluate(DIALOG_JS))
            rep["missing_node_types"] = page.evaluate("window.__qi.missing")
            rep["graph_nodes"] = page.evaluate("app.graph._nodes.map(n => n.type)")
            if screenshot:
                page.screenshot(path=str(screenshot))
            if export_api:  # stringified in the page: Playwright would turn `undefined` into null
                rep["exported_api"] = json.loads(page.evaluate(
                    "async () => JSON.stringify((await app.graphToPrompt()).output)"))
            if edits:
                rep["edited"] = page.evaluate(EDIT_JS, edits)
            if queue:
                rep.update(self._queue(page))
        finally:
            page.close()
        rep["unexpected_errors"] = [e for e in rep["page_errors"] + rep["console_errors"] if not is_noise(e)]
        return rep

    def _queue(self, page) -> dict:
        out = {}
        pred = lambda r: r.url.endswith("/prompt") and r.request.method == "POST"  # noqa: E731
        with page.expect_response(pred, timeout=self.timeout_ms) as info:
            page.evaluate("app.queuePrompt(0, 1)")
        resp = info.value
        body = resp.json()
        out["queue_http_status"] = resp.status
        out["queue_response"] = body
        pid = body.get("prompt_id")
        from .prompt_queue import wait_for

        if pid:
            res = wait_for(self.url, pid, time.time(), self.timeout_ms / 1000)
            out["run_status"] = "success" if res.ok else res.stage
            out["run_error"] = None if res.ok else res.error_message()
            out["run_outputs"] = res.outputs
        return out

    def node_help(self, node_type: str, screenshot: Optional[Path] = None) -> dict:
        """Open ComfyUI's node info panel for one node, as a user does: put the node on the canvas, select
        it, press the selection toolbox's info button (`data-testid="info-button"`), and read the panel
        (`.node-help-content`: frontend 1.27.x shows it in the node library side bar, 1.49.x in the Info tab
        of the right-hand properties panel). Reports the text shown and the docs URLs the page fetched."""
        rep = {"node_type": node_type, "page_errors": [], "console_errors": [], "failed_requests": [],
               "docs_requests": []}
        page = self._open(rep)
        page.on("response", lambda r: "/docs/" in r.url and rep["docs_requests"].append(f"{r.status} {r.url}"))
        try:
            page.evaluate("""(type) => {
                app.graph.clear();
                const node = LiteGraph.createNode(type);
                node.pos = [300, 200];
                app.graph.add(node);
                app.canvas.deselectAll?.();
                app.canvas.selectNode(node);
                app.canvas.setDirty(true, true);
            }""", node_type)
            button = page.locator('[data-testid="info-button"]').first
            button.wait_for(state="attached", timeout=self.timeout_ms)
            # the toolbox follows the node in canvas coordinates and may sit outside the viewport: press it
            # through the DOM (the same click handler a user's click reaches)
            button.evaluate("b => b.click()")
            page.wait_for_function("""() => { const el = document.querySelector('.node-help-content');
                return el && el.innerText.trim().length > 0 && !el.querySelector('.p-progressspinner'); }""",
                                   timeout=self.timeout_ms)
            page.wait_for_timeout(500)
            rep["panel_text"] = page.evaluate("document.querySelector('.node-help-content').innerText")
            rep["panel_html"] = page.evaluate("document.querySelector('.node-help-content').innerHTML")
            if screenshot:
                page.screenshot(path=str(screenshot))
        finally:
            page.close()
        rep["unexpected_errors"] = [e for e in rep["page_errors"] + rep["console_errors"] if not is_noise(e)]
        return rep
