"""Prints per-tier test counts from pytest's JUnit XML files and one closing line CI can read."""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(path: Path) -> tuple[int, int, int]:
    if not path.exists():
        return 0, 0, 0
    root = ET.parse(path).getroot()  # noqa: S314 (our own pytest's report)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = sum(int(s.get("tests", 0)) for s in suites)
    bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return tests - bad - skipped, bad, skipped


def main() -> int:
    total_ok = total_bad = total_skip = 0
    for arg in sys.argv[1:]:
        tier, _, files = arg.partition("=")
        ok = bad = skip = 0
        for file in files.split(","):
            o, b, k = counts(Path(file))
            ok, bad, skip = ok + o, bad + b, skip + k
        print(f"{tier} tier: {ok} passed, {bad} failed, {skip} skipped")
        if ok == 0:
            print(f"{tier} tier: no test passed: a tier that runs nothing is a failure")
            bad += 1
        total_ok, total_bad, total_skip = total_ok + ok, total_bad + bad, total_skip + skip
    print(f"{total_ok} passed, {total_bad} failed, {total_skip} skipped")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
