"""Write ComfyUI's node-info pages (`web/docs/<NodeName>.md`) from the node reference in docs/.

One source: each node's `## <NodeName>` section in docs/ (docs/nodes.md, or another page for a node
documented there), followed by any other docs section whose heading names the node. ComfyUI's
frontend (1.27.x) asks `/extensions/<pack folder>/docs/<NodeName>/<locale>.md`, then
`/extensions/<pack folder>/docs/<NodeName>.md`, and the server serves them from the pack's
`WEB_DIRECTORY` (`web/`, set in the root __init__.py). Relative links are rewritten to the
repository's pages, since the panel cannot follow them.

    python tests/build_node_docs.py            # write web/docs/
    python tests/build_node_docs.py --check    # exit 1 if a committed file differs (tests/test_readme.py checks it too)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from readme_sections import DOCS, ROOT, Section, all_sections, node_reference  # noqa: E402

WEB_DOCS = ROOT / "web" / "docs"
REPO_URL = "https://github.com/qwen-identity/comfyui-qwen-identity/blob/main"


def _absolute_links(text: str, page: Path) -> str:
    """Relative Markdown links -> repository URLs (the panel is served from /extensions/…/docs/)."""
    def fix(m):
        label, target = m.group(1), m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            return m.group(0)
        file_part, hash_, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        rel = dest.relative_to(ROOT).as_posix()
        return f"[{label}]({REPO_URL}/{rel}{hash_}{anchor})"
    return re.sub(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)", fix, text)


def _demote(body: str, by: int) -> str:
    """Shift headings so the page's own title is the only `#`."""
    if by <= 0:
        return body
    out, fence = [], False
    for line in body.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and re.match(r"^#{1,5}\s", line):
            line = "#" * by + line
        out.append(line)
    return "".join(out)


def _part(sec: Section, top_level: int) -> str:
    return _absolute_links(_demote(sec.body, top_level - sec.level), sec.path).strip("\n")


def render(name: str, secs=None) -> str:
    """The node-info page of one node."""
    primary, extra = node_reference(name, secs)
    if len(primary) != 1:
        where = ", ".join(str(s.path.relative_to(ROOT)) for s in primary) or "nowhere"
        raise ValueError(f"{name}: expected exactly one '## {name}' section in docs/*.md, found {len(primary)} "
                         f"({where})")
    main = primary[0]
    parts = [f"# {name}", _part(main, 1)]
    for sec in extra:
        parts.append(f"## {sec.plain_title}\n\n{_part(sec, 2)}")
    page = main.path.relative_to(ROOT).as_posix()
    src = "" if page == "docs/nodes.md" else f"This page: [{page}]({REPO_URL}/{page}). "
    parts.append(f"---\n{src}All nodes of the pack: [docs/nodes.md]({REPO_URL}/docs/nodes.md).")
    return "\n\n".join(parts) + "\n"


def _node_classes() -> dict:
    from comfyui_harness.build_workflows import _import_pack  # "import THIS checkout as qwen_identity"

    _import_pack()
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS


def render_all(names=None) -> dict:
    """{path: text} for every node's page."""
    names = sorted(names if names is not None else _node_classes())
    secs = all_sections()
    return {WEB_DOCS / f"{n}.md": render(n, secs) for n in names}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    files = render_all()
    stale = [str(p.relative_to(ROOT)) for p, t in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != t]
    extra = [str(p.relative_to(ROOT)) for p in WEB_DOCS.glob("*.md") if p not in files] if WEB_DOCS.is_dir() else []
    if "--check" in argv:
        print("stale: " + ", ".join(stale + extra) if stale or extra else "web/docs up to date")
        return 1 if stale or extra else 0
    WEB_DOCS.mkdir(parents=True, exist_ok=True)
    for p in extra:
        (ROOT / p).unlink()
        print(f"removed {p}")
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
