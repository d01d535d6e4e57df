"""Sections of the README and docs/*.md by heading, and the relative links between them.

Shared by the CI-side documentation checks (tests/test_readme.py), the live-ComfyUI check
(tests/test_comfyui_integration.py) and the node-docs generator (tests/build_node_docs.py).
A section is the text under a heading up to the next heading of the same or a higher level, so a
node's `###` sub-sections (e.g. "Strength (α) semantics" under `## InjectResidual`) belong to it.
Headings inside ``` code fences are not headings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Pages other branches write (they exist once everything is merged). Links to them are allowed to
# dangle until then; the lead trims this list at merge time (test_pending_pages_are_still_missing
# fails for any entry that exists, so the list cannot go stale).
PENDING_PAGES: set[str] = set()   # docs pages linked before they exist (none now)

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@dataclass
class Section:
    path: Path
    level: int
    title: str   # as written (backticks kept)
    body: str    # text after the heading line, up to the next heading of the same or a higher level

    @property
    def plain_title(self) -> str:
        return self.title.replace("`", "").strip()


def _headings(text: str):
    """(level, title, start of the heading line, end of it) for every heading outside code fences."""
    out, fence, pos = [], False, 0
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            m = _HEADING.match(line.rstrip("\n"))
            if m:
                out.append((len(m.group(1)), m.group(2), pos, pos + len(line)))
        pos += len(line)
    return out


def sections(text: str, path: Path = Path("?")) -> list:
    hs = _headings(text)
    out = []
    for i, (level, title, _, end) in enumerate(hs):
        stop = next((s for lv, _, s, _ in hs[i + 1:] if lv <= level), len(text))
        out.append(Section(path, level, title, text[end:stop]))
    return out


def readme_section(readme: str, title: str):
    """The text under the heading `title` (in backticks or not, any level), or None."""
    for sec in sections(readme):
        if sec.plain_title == title or sec.plain_title.startswith(title + " "):
            return sec.body
    return None


def doc_pages() -> list:
    """README.md and every docs/*.md page (every helper's page counts)."""
    return [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))


def all_sections() -> list:
    return [s for p in doc_pages() for s in sections(p.read_text(encoding="utf-8"), p)]


def _names(title: str, name: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", title.replace("`", "")) is not None


def sections_about(name: str, pages_sections=None) -> list:
    """Every section, in the README or any docs page, whose heading names `name` (a node class or
    `qwen-identity <command>`): the primary reference and any page that adds to it."""
    return [s for s in (pages_sections if pages_sections is not None else all_sections()) if _names(s.title, name)]


def node_reference(name: str, pages_sections=None):
    """(the one `## <NodeName>` section in docs/, the other sections about the node in docs/)."""
    about = [s for s in sections_about(name, pages_sections) if s.path.parent == DOCS]
    primary = [s for s in about if s.plain_title == name]
    return primary, [s for s in about if s.plain_title != name]


# ---- links -----------------------------------------------------------------------------------------

def github_anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    t = re.sub(r"<[^>]+>", "", title).strip().lower()
    t = re.sub(r"[^\w\- ]", "", t)
    return t.replace(" ", "-")


def relative_links(path: Path) -> list:
    """(target, line number) of every relative Markdown link or image in a page (outside code fences)."""
    out, fence = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        for m in _LINK.finditer(line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            out.append((target, n))
    return out


def broken_links(pages=None) -> list:
    """'page:line -> target (why)' for every relative link that does not resolve (file, then anchor)."""
    bad = []
    for page in pages or doc_pages():
        for target, line in relative_links(page):
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            where = f"{page.relative_to(ROOT)}:{line} -> {target}"
            if not dest.exists():
                if rel not in PENDING_PAGES:
                    bad.append(f"{where} (no such file)")
                continue
            if anchor and dest.suffix == ".md":
                anchors = {github_anchor(t) for _, t, _, _ in _headings(dest.read_text(encoding="utf-8"))}
                if anchor not in anchors:
                    bad.append(f"{where} (no heading with anchor #{anchor})")
    return bad
