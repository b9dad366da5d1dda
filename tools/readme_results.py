"""Regenerate the result blocks of README.md and docs/*.md from the committed results files.

A generated block sits between two HTML comments that name what it shows and where from::

    <!-- results: demo benchmarks/results/demo -->
    ...                         (generated: never edit by hand)
    <!-- end results -->

Kinds:

- ``demo DIR``: the demo's terminal output (run line, table, summary lines) rebuilt from
  ``DIR/results.json`` with the demo's own report functions;
- ``demo-seeds DIR [DIR ...]``: one markdown table over several demo runs (one per seed),
  ``a / b`` per cell;
- ``last-table FILE.md [N]``: table N (default 1) of the newest run section of a benchmark
  results file, with the section's heading and load average as a caption line;
- ``profile FILE.json``: the conflict profiler's per-layer table and reading
  (``ConflictReport.format_summary``) from a committed ``report.json``.

    python tools/readme_results.py            # check: exit 1 and a diff when a block is stale
    python tools/readme_results.py --write    # rewrite the blocks in place

``tests/test_readme_results.py`` runs the check, so a figure in the docs cannot drift from
its results file: re-run the benchmark, then ``--write``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- results: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end results -->)", re.S)


def _report():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bucketmoo_kernels.demo import report
    return report


def demo_block(directory: str) -> str:
    report = _report()
    results = json.loads((ROOT / directory / "results.json").read_text())
    s = results["settings"]
    line = report.run_line(s["steps"], s["runs"], s["languages"], s["unseen"])
    summary = "\n".join(f"* {x}" for x in report.summary_lines(results))
    return f"```text\n{line}\n\n{report.format_table(results)}\n\n{summary}\n```\n"


def demo_seeds_block(*directories: str) -> str:
    report = _report()
    tables = []
    for directory in directories:
        results = json.loads((ROOT / directory / "results.json").read_text())
        header, rows = report.table_rows(results)
        tables.append((results["settings"]["seed"], header, {r[0]: dict(zip(header, r)) for r in rows}))
    header = tables[0][1]
    columns = [c for c in header if c not in ("step ms", "mem MiB", "conf bkt %", "conf pair %")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if i == 0 else "---:"
                                                            for i in range(len(columns))) + "|"]
    for name in tables[0][2]:
        cells = [name]
        for column in columns[1:]:
            values = [rows.get(name, {}).get(column, "n/a") for _, _, rows in tables]
            cells.append(values[0] if len(set(values)) == 1 else " / ".join(values))
        lines.append("| " + " | ".join(cells) + " |")
    seeds = " / ".join(f"seed {seed}" for seed, _, _ in tables)
    return f"Cells: {seeds} (one value where they agree).\n\n" + "\n".join(lines) + "\n"


def last_table_block(path: str, which: str = "1") -> str:
    """Table number ``which`` (1-based) of the newest run section of ``path``."""
    text = (ROOT / path).read_text()
    last = re.split(r"^## ", text, flags=re.M)[-1]
    heading = last.splitlines()[0].strip()
    load = re.search(r"^- load average[^:]*: (.*)$", last, flags=re.M)
    tables, current = [], []
    for line in last.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if len(tables) < int(which):
        raise ValueError(f"{path}: the newest run section ({heading}) has {len(tables)} table(s), not {which}")
    caption = f"From [{Path(path).name}]({path}), {heading}"
    caption += f" (load average {load.group(1)} at the start)" if load else ""
    return caption + ":\n\n" + "\n".join(tables[int(which) - 1]) + "\n"


def profile_block(path: str) -> str:
    """The conflict profiler's per-layer table and reading, from a committed ``report.json``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bucketmoo_kernels.profile import ConflictReport

    report = ConflictReport.from_dict(json.loads((ROOT / path).read_text()))
    when = ", ".join(f"{k} {report.meta[k]}" for k in ("date", "commit") if k in report.meta)
    caption = f"From [{Path(path).name}]({path})" + (f" ({when})" if when else "")
    return f"{caption}:\n\n```text\n{report.format_summary()}\n```\n"


KINDS = {"demo": demo_block, "demo-seeds": demo_seeds_block, "last-table": last_table_block,
         "profile": profile_block}


def render(spec: str, document: str) -> str:
    kind, *args = spec.split()
    if kind not in KINDS:
        raise ValueError(f"{document}: unknown results block kind {kind!r}; known: {', '.join(KINDS)}")
    body = KINDS[kind](*args)
    if document.startswith("docs/"):
        body = re.sub(r"\]\((benchmarks/[^)]+)\)", r"](../\1)", body)
    return body


def regenerate(document: str) -> tuple[str, str]:
    """``(current text, regenerated text)`` of one document."""
    text = (ROOT / document).read_text()
    new = BLOCK.sub(lambda m: m.group(1) + render(m.group("spec"), document) + m.group(4), text)
    return text, new


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite stale blocks in place")
    args = parser.parse_args(argv)
    stale = 0
    for document in DOCUMENTS:
        text, new = regenerate(document)
        if text == new:
            continue
        stale += 1
        if args.write:
            (ROOT / document).write_text(new)
            print(f"rewrote {document}")
        else:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       document, document + " (regenerated)"))
    if stale and not args.write:
        print(f"\n{stale} document(s) have stale result blocks: python tools/readme_results.py --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
