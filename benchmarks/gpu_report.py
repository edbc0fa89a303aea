"""The last step of benchmarks/gpu_check.sh: one JSON and one Markdown file from its parts.

    python benchmarks/gpu_report.py --out-dir OUT --bench-rc 0 --tests-rc 0 --seconds 412

Reads OUT/gpu_bench.json (benchmarks/gpu_bench.py), OUT/gpu_tests.xml (pytest's JUnit report)
and OUT/env.txt; writes OUT/gpu_check.json and OUT/gpu_check.md (paste the latter into
benchmarks/RESULTS.md). Missing parts are reported as missing, never invented.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def read_junit(path: Path) -> dict:
    """Per-test outcome and seconds from a pytest JUnit XML file."""
    if not path.exists():
        return {"missing": str(path)}
    root = ET.parse(path).getroot()
    tests = []
    for case in root.iter("testcase"):
        outcome = "passed"
        message = ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:300]
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message})
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def merge(*parts: dict) -> dict:
    """One test report from several JUnit reports (missing ones listed)."""
    tests = [t for p in parts for t in p.get("tests", [])]
    missing = [p["missing"] for p in parts if "missing" in p]
    if not tests and missing:
        return {"missing": ", ".join(missing)}
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    if missing:
        counts["report missing"] = len(missing)
    return {"counts": counts, "tests": tests, "missing_reports": missing}


def render(report: dict) -> str:
    lines = ["## GPU check", "", f"- date: {report['env'].get('date', '?')}; total "
             f"{report['seconds']} s; benchmark exit {report['bench_rc']}, tests exit "
             f"{report['tests_rc']}"]
    for line in report["env"].get("lines", [])[1:]:
        lines.append(f"- {line}")
    lines.append("")
    if report.get("bench_md"):
        lines += [report["bench_md"].rstrip(), ""]
    else:
        lines += ["GPU benchmark: no result (see gpu_bench.json / the console).", ""]
    tests = report["tests"]
    if "missing" in tests:
        lines.append(f"GPU tests: no JUnit report ({tests['missing']}).")
    else:
        lines += [f"GPU tests: {', '.join(f'{v} {k}' for k, v in sorted(tests['counts'].items()))}",
                  "", "| test | outcome | s |", "|---|---|---|"]
        for t in tests["tests"]:
            msg = f" ({t['message']})" if t["outcome"] != "passed" and t["message"] else ""
            lines.append(f"| {t['name']} | {t['outcome']}{msg} | {t['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--bench-rc", type=int, default=-1)
    ap.add_argument("--tests-rc", type=int, default=-1)
    ap.add_argument("--seconds", type=int, default=-1)
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    env_lines = (out / "env.txt").read_text().splitlines() if (out / "env.txt").exists() else []
    date = env_lines[0].removeprefix("date: ") if env_lines else "?"
    bench_json = out / "gpu_bench.json"
    report = {
        "env": {"date": date, "lines": env_lines},
        "seconds": args.seconds, "bench_rc": args.bench_rc, "tests_rc": args.tests_rc,
        "bench": json.loads(bench_json.read_text()) if bench_json.exists() else None,
        "bench_md": (out / "gpu_bench.md").read_text() if (out / "gpu_bench.md").exists() else None,
        "tests": merge(read_junit(out / "gpu_tests.xml"), read_junit(out / "gpu_tests_learn.xml")),
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    text = render(report)
    (out / "gpu_check.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
