"""Sum the JUnit XML files of all test tiers into one closing line.

A test run on several ranks counts once: failed if it failed on any rank, skipped if
skipped on all, else passed. Exits 1 when anything failed or no test ran at all.
"""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

OUTCOME_ORDER = {"passed": 0, "skipped": 1, "failed": 2}


def outcomes(folder: Path) -> dict[tuple[str, str], str]:
    results: dict[tuple[str, str], str] = {}
    for path in sorted(folder.glob("*.xml")):
        tier = path.stem.rsplit("-rank", 1)[0]
        for case in ET.parse(path).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "failed"
            elif case.find("skipped") is not None:
                outcome = "skipped"
            else:
                outcome = "passed"
            key = (tier, f"{case.get('classname')}::{case.get('name')}")
            previous = results.get(key)
            if previous is None or (outcome == "failed") or (previous == "skipped" and outcome == "passed"):
                results[key] = outcome
    return results


def main() -> int:
    folder = Path(sys.argv[1])
    results = outcomes(folder)
    counts = {name: sum(1 for o in results.values() if o == name) for name in OUTCOME_ORDER}
    for (tier, test), outcome in sorted(results.items()):
        if outcome == "failed":
            print(f"FAILED [{tier}] {test}")
    print(f"all tiers: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return 1 if counts["failed"] or not results else 0


if __name__ == "__main__":
    sys.exit(main())
