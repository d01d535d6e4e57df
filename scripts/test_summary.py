"""One closing line over several pytest sessions (`./run test` runs two: the pack's suite in ./.venv and
the real-ComfyUI tests in ComfyUI's venv), read from their JUnit XML reports.

    python scripts/test_summary.py REPORT.xml [REPORT.xml ...]

Prints one line per report, then `total: N passed, N failed, N skipped` last (errors count as failed),
the plain form CI reads as the run's closing line. A report that is missing or unreadable counts as one
failure (its session crashed before writing it). Exit status 1 when anything failed or nothing ran.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(path: Path) -> dict:
    """passed/failed/skipped of one pytest JUnit report (failures and errors both count as failed)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = dict(passed=0, failed=0, skipped=0)
    for s in suites:
        tests, skipped = int(s.get("tests", 0)), int(s.get("skipped", 0))
        failed = int(s.get("failures", 0)) + int(s.get("errors", 0))
        total["failed"] += failed
        total["skipped"] += skipped
        total["passed"] += max(tests - failed - skipped, 0)
    return total


def main(argv: list[str]) -> int:
    total = dict(passed=0, failed=0, skipped=0)
    for arg in argv:
        path = Path(arg)
        try:
            c = counts(path)
        except (OSError, ET.ParseError) as e:
            print(f"{path.name}: no report ({e.__class__.__name__}); counted as 1 failed")
            c = dict(passed=0, failed=1, skipped=0)
        else:
            print(f"{path.name}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
        for k in total:
            total[k] += c[k]
    print(f"total: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 1 if total["failed"] or not total["passed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
