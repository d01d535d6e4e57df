"""Render a UI workflow on ComfyUI's real canvas to a PNG (the README's picture of the graph).

    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python tests/comfyui_harness/render_workflow.py \
        workflows/qwen_identity_alpha_grid.json docs/images/alpha_grid_workflow.png

Starts a server with this checkout as its only pack (no models: the dropdowns show the workflow's own
file names), loads the file with `app.loadGraphData`, fits the graph at a zoom where LiteGraph still
draws text, hides the canvas toolbar, clips to the nodes and writes the PNG quantised to 128 colours
(Pillow) so it stays small. Needs the system Chromium, like the browser tests.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from comfyui_harness.browser import CHROME_ARGS  # noqa: E402
from comfyui_harness.env import chromium_path, comfyui_dir  # noqa: E402
from comfyui_harness.server import prepare_base_dir, start_server  # noqa: E402

ROOT = HERE.parents[1]
PACK = "comfyui-qwen-identity"
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
            "Comfy.Workflow.ShowMissingNodesWarning": False, "Comfy.Minimap.Visible": False,
            "Comfy.Graph.CanvasInfo": False, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.2}
FIT_JS = """() => { const c = app.canvas, ns = app.graph._nodes;
  let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
  for (const n of ns) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 40);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); }
  const r = document.querySelector('#graph-canvas').getBoundingClientRect();
  const s = Math.min((r.width - 40) / (x1 - x0), (r.height - 40) / (y1 - y0));
  c.ds.scale = s; c.ds.offset = [(r.width / s - (x1 - x0)) / 2 - x0, (r.height / s - (y1 - y0)) / 2 - y0];
  c.setDirty(true, true);
  const m = 12;
  return {x: r.left + (x0 + c.ds.offset[0]) * s - m, y: r.top + (y0 + c.ds.offset[1]) * s - m,
          width: (x1 - x0) * s + 2 * m, height: (y1 - y0) * s + 2 * m}; }"""
HIDE_TOOLBAR_JS = """() => { for (const [x, y] of [[innerWidth - 30, innerHeight - 30], [innerWidth - 150, innerHeight - 30]]) {
  let el = document.elementFromPoint(x, y);
  while (el && el.id !== 'graph-canvas' && el !== document.body && el.getBoundingClientRect().height < 120) {
    el.style.visibility = 'hidden'; el = el.parentElement; } } }"""


def render(workflow: Path, out: Path, viewport=(2600, 1400), colors: int = 128) -> Path:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    base = Path(tempfile.mkdtemp(prefix="comfy_render_"))
    atexit.register(shutil.rmtree, base, True)
    prepare_base_dir(base, {PACK: ROOT})
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    raw = out.with_suffix(".raw.png")
    with start_server(comfyui_dir(), packs={PACK: ROOT}, base_dir=base) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        page.goto(srv.url)
        page.wait_for_function("window.app && window.app.graph && window.app.vueAppReady", timeout=120_000)
        page.evaluate("wf => app.loadGraphData(wf)", json.loads(workflow.read_text()))
        page.wait_for_timeout(2000)
        box = page.evaluate(FIT_JS)
        page.add_style_tag(content=".p-toast {display: none !important}")
        page.evaluate(HIDE_TOOLBAR_JS)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(raw), clip=box)
        browser.close()
    with Image.open(raw) as im:
        im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    raw.unlink()
    return out


if __name__ == "__main__":
    wf, dest = Path(sys.argv[1]), Path(sys.argv[2])
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(render(wf, dest), dest.stat().st_size, "bytes")
