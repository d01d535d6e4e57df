"""The README documents every node input and every CLI option (checked without ComfyUI)."""

from pathlib import Path

from readme_sections import readme_section

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = [README] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md")) if not p.name.startswith("_")]


def docs_section(title: str):
    """Every `### <title>` section of the README and docs/*.md, joined (None when there is none)."""
    found = [s for s in (readme_section(text, title) for text in DOCS) if s is not None]
    return "\n".join(found) if found else None


def test_every_node_input_is_documented():
    from qwen_identity.nodes import NODE_CLASS_MAPPINGS

    missing = []
    for name, cls in NODE_CLASS_MAPPINGS.items():
        section = readme_section(README, name)
        if section is None:
            missing.append(f"{name}: no '### {name}' section")
            continue
        types = cls.INPUT_TYPES()
        for sec in ("required", "optional"):
            for inp, spec in types.get(sec, {}).items():
                if f"`{inp}`" not in section:
                    missing.append(f"{name}.{inp}")
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert not missing, "README does not document: " + "; ".join(missing)


def test_every_cli_option_is_documented():
    from qwen_identity.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = []
    for name, p in sub.choices.items():
        section = docs_section(f"qwen-identity {name}")
        if section is None:
            missing.append(f"{name}: no '### `qwen-identity {name}`' section")
            continue
        for action in p._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help" and opt not in section:
                    missing.append(f"{name} {opt}")
    assert not missing, "README does not document: " + "; ".join(missing)
