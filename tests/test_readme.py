"""The README and docs/ document every node input and every CLI option, their links resolve, and
ComfyUI's node-info pages (web/docs/) are the node reference (all checked without ComfyUI).

Every docs/*.md page counts: an input or option is documented when it appears (in backticks for node
inputs) in a section, in the README or any docs page, whose heading names the node (`## InjectResidual`,
`### InjectResidual: masks`) or the command (`## qwen-identity sweep`).
"""

import re
import sys
from pathlib import Path

import pytest

from readme_sections import (DOCS, PENDING_PAGES, ROOT, all_sections, broken_links, node_reference,
                             relative_links, sections_about)

README = ROOT / "README.md"
README_LIMIT = 15 * 1024  # a README for ComfyUI users; the reference lives in docs/


@pytest.fixture(scope="module")
def secs():
    return all_sections()


def test_every_node_input_is_documented(secs):
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    missing = []
    for name, cls in NODE_CLASS_MAPPINGS.items():
        primary, extra = node_reference(name, secs)
        if len(primary) != 1:
            missing.append(f"{name}: needs exactly one '## {name}' section in docs/*.md (found {len(primary)})")
            continue
        text = "".join(s.body for s in primary + extra)
        types = cls.INPUT_TYPES()
        for sec in ("required", "optional"):
            for inp, spec in types.get(sec, {}).items():
                if f"`{inp}`" not in text:
                    missing.append(f"{name}.{inp}")
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert not missing, "docs/ does not document: " + "; ".join(missing)


def test_every_cli_option_is_documented(secs):
    from qwen_identity.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = []
    for name, p in sub.choices.items():
        about = sections_about(f"qwen-identity {name}", secs)
        if not about:
            missing.append(f"{name}: no section headed '`qwen-identity {name}`' in README.md or docs/*.md")
            continue
        text = "".join(s.body for s in about)
        for action in p._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help" and not re.search(rf"{re.escape(opt)}(?![\w-])", text):
                    missing.append(f"{name} {opt}")
    assert not missing, "docs/ does not document: " + "; ".join(missing)


def test_node_and_cli_checks_can_fail(tmp_path):
    """The matching above is by heading and whole option name: a near miss does not count."""
    from readme_sections import sections

    page = tmp_path / "x.md"
    text = "## `qwen-identity sweep`\n`--alphas-file` only\n## Other\n`--alphas`\n"
    about = sections_about("qwen-identity sweep", sections(text, page))
    assert len(about) == 1 and not re.search(r"--alphas(?![\w-])", about[0].body)
    assert sections_about("InjectResidual", sections("## InjectResidualX\n`strength`\n", page)) == []


def test_relative_links_resolve():
    bad = broken_links()
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_link_check_can_fail(tmp_path, monkeypatch):
    import readme_sections

    monkeypatch.setattr(readme_sections, "ROOT", tmp_path)
    monkeypatch.setattr(readme_sections, "PENDING_PAGES", {"docs/pending.md"})
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n## Some heading\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#some-heading) [no file](docs/b.md) [no anchor](docs/a.md#other)\n"
                    "[pending](docs/pending.md) ![img](pic.png) [web](https://example.org/x)\n"
                    "```\n[in code](nowhere.md)\n```\n")
    bad = broken_links([page])
    assert len(bad) == 3 and "docs/b.md (no such file)" in bad[0] and "#other" in bad[1], bad
    assert "pic.png (no such file)" in bad[2], bad


def test_pending_pages_are_still_missing():
    """PENDING_PAGES lets links to pages other branches write dangle; trim an entry once its page exists."""
    merged = sorted(p for p in PENDING_PAGES if (ROOT / p).exists())
    assert not merged, f"these pages exist now: remove them from readme_sections.PENDING_PAGES: {merged}"


def test_every_docs_page_is_linked_from_the_index():
    index = DOCS / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t, _ in relative_links(index) if t.partition("#")[0]}
    pages = {p.resolve() for p in DOCS.glob("*.md")} - {index.resolve()}
    pending = {(ROOT / p).resolve() for p in PENDING_PAGES}
    assert not pages - linked, f"docs/README.md does not link: {sorted(p.name for p in pages - linked)}"
    assert pending <= linked, "docs/README.md should link the pending pages"
    assert "docs/README.md" in README.read_text()


def test_readme_is_short_and_links_its_reference():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= README_LIMIT, f"README is {len(text.encode())} bytes; move reference text to docs/"
    for page in ("nodes", "cli", "training", "measuring", "performance", "reliability", "development", "workflows"):
        assert f"(docs/{page}.md" in text, f"README does not link docs/{page}.md"
    for heading in ("Install into ComfyUI", "Models: which files go where", "Workflows", "The nodes at a glance",
                    "Train a head in three commands", "Common errors and fixes", "The two commands"):
        assert re.search(rf"^## {re.escape(heading)}$", text, re.M), heading
    assert "./run demo" in text and "./run test" in text


def test_no_internal_jargon_in_node_texts():
    """Node descriptions and tooltips say what the user gets, without project shorthand."""
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    jargon = re.compile(r"\bPOC\b|proof of concept|\bseed recipe\b|\bissue \d+|see README", re.I)
    found = []
    for name, cls in NODE_CLASS_MAPPINGS.items():
        texts = [("DESCRIPTION", cls.DESCRIPTION)] + [(f"output {i}", t) for i, t in
                                                      enumerate(getattr(cls, "OUTPUT_TOOLTIPS", ()))]
        for sec in cls.INPUT_TYPES().values():
            texts += [(inp, spec[1].get("tooltip", "")) for inp, spec in sec.items() if len(spec) > 1]
        found += [f"{name}.{where}: {jargon.search(t).group(0)!r}" for where, t in texts if jargon.search(t)]
    assert not found, found


# ---- ComfyUI's node info panel ----------------------------------------------------------------------

def _builder():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build_node_docs

    return build_node_docs


def test_node_info_pages_are_generated_from_the_node_reference():
    """web/docs/<Node>.md, for every node and nothing else, equals what tests/build_node_docs.py renders."""
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    b = _builder()
    files = b.render_all(list(NODE_CLASS_MAPPINGS))
    committed = {p.name for p in b.WEB_DOCS.glob("*.md")}
    assert committed == {p.name for p in files}, "run: python tests/build_node_docs.py"
    stale = [p.name for p, text in files.items() if p.read_text(encoding="utf-8") != text]
    assert not stale, f"stale node info pages {stale}; run: python tests/build_node_docs.py"


def test_node_info_page_carries_the_whole_reference(secs):
    """A node's page holds its docs/nodes.md section, sub-sections included, with links made absolute."""
    b = _builder()
    page = b.render("InjectResidual", secs)
    primary, _ = node_reference("InjectResidual", secs)
    assert page.startswith("# InjectResidual\n")
    assert "### Strength (α) semantics and the step window" in page  # the sub-section came along
    for line in primary[0].body.splitlines():
        if line.startswith("|"):
            assert line in page  # every table row (the inputs) verbatim
    assert not re.search(r"\]\((?!https?://)[^)]*\)", page), "relative link left in a served page"
    with pytest.raises(ValueError, match="exactly one '## NoSuchNode'"):
        b.render("NoSuchNode", secs)


def test_web_directory_is_declared():
    src = (ROOT / "__init__.py").read_text()
    m = re.search(r'^WEB_DIRECTORY\s*=\s*"([^"]+)"', src, re.M)
    assert m and (ROOT / m.group(1)).resolve() == (ROOT / "web").resolve()
    assert not list((ROOT / "web").rglob("*.js")), "a .js file in web/ would be loaded into every user's frontend"
