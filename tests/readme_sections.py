"""Find a README section by its heading (shared by the CI-side and the live-ComfyUI documentation checks)."""

from __future__ import annotations

import re


def readme_section(readme: str, title: str):
    """The text under README's `### <title>` heading (title may be in backticks), up to the next heading."""
    m = re.search(rf"^###\s+`?{re.escape(title)}`?(?=[\s`]|$).*$", readme, flags=re.M)
    if not m:
        return None
    nxt = re.search(r"^##", readme[m.end():], flags=re.M)
    return readme[m.end(): m.end() + nxt.start() if nxt else len(readme)]
