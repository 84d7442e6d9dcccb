"""The compatibility matrix: what each backend declares, merged with what a conformance run verified, and where.

A conformance run (tests/backends) writes a report: for each backend it ran on, each feature's outcome
there. `paged info --matrix` renders every registered backend's declared facts and, given reports,
marks each fact verified (✓) or failed (✗) and names where; COMPATIBILITY.md is that rendering.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paged.backends.interface import Backend
from paged.errors import UserError

FEATURES = ("attention", "graphs", "dtypes", "fp8", "quantization", "kv cache", "tensor parallel", "prefix caching",
            "greedy")
NOT_VERIFIED = "not yet on hardware"


@dataclass
class Row:
    """One backend: its declared facts by feature, and the outcomes reports give them."""

    name: str
    declared: dict[str, str]
    outcomes: dict[str, str] = field(default_factory=dict)  # feature -> "passed" / "failed"
    verified_dtypes: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def declared_facts(backend: type[Backend]) -> dict[str, str]:
    """A backend class's own claims per feature; the fp8 type is read from an instance never initialised,
    since fp8_dtype depends on the class (and, on a device, on its architecture) but not on state."""
    try:
        fp8 = backend.__new__(backend).fp8_dtype()
    except Exception:  # a query that needs the device it does not have
        fp8 = None
    return {
        "attention": "yes",
        "graphs": "yes" if backend.supports_graphs else "no",
        "dtypes": ", ".join(str(d).removeprefix("torch.") for d in backend.supported_dtypes),
        "fp8": str(fp8).removeprefix("torch.") if fp8 is not None else "no",
        "quantization": ", ".join(backend.supported_quantizations) or "none",
        "kv cache": ", ".join(backend.supported_kv_cache_dtypes),
        "tensor parallel": backend.dist_backend,
        "prefix caching": "yes",
        "greedy": "yes",  # greedy tokens equal a reference: the CPU backend, or transformers
    }


def merge(rows: list[Row], reports: list[dict[str, Any]]) -> list[Row]:
    """Mark rows with the reports' outcomes, in order: a later report's outcome for a feature wins."""
    by_name = {row.name: row for row in rows}
    for report in reports:
        for name, result in report["backends"].items():
            row = by_name.setdefault(name, Row(name, {}))
            ran = {f: s for f, s in result["features"].items() if s in ("passed", "failed")}
            if not ran:
                continue
            row.outcomes.update(ran)
            if result.get("dtypes"):
                row.verified_dtypes = result["dtypes"]
            where = f"{report['where']} ({report['date']})"
            if where not in row.where:
                row.where.append(where)
            if result.get("note"):
                row.notes.append(f"{name} on {report['where']}: {result['note']}")
    return list(by_name.values())


def _cell(row: Row, feature: str) -> str:
    text = row.declared.get(feature, "?")
    outcome = row.outcomes.get(feature)
    if outcome == "failed":
        return f"{text} ✗"
    if outcome == "passed" and feature == "dtypes" and row.verified_dtypes:
        return f"{text} (✓ {', '.join(row.verified_dtypes)})"
    return f"{text} ✓" if outcome == "passed" else text


def to_markdown(rows: list[Row]) -> str:
    """The matrix as a markdown table (padded, so it reads as plain text too), with its notes."""
    header = ["backend", *FEATURES, "verified"]
    table = [[r.name, *(_cell(r, f) for f in FEATURES), "; ".join(r.where) or NOT_VERIFIED]
             for r in rows]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, table)]
    notes = [n for r in rows for n in r.notes]
    if notes:
        out += ["", "Where each row was verified:", "", *(f"- {n}" for n in notes)]
    return "\n".join(out) + "\n"


# The conformance reports behind COMPATIBILITY.md, shipped with the package so that `paged info --matrix`
# prints the same matrix wherever paged is installed.
VERIFIED = Path(__file__).with_name("verified")


def shipped_reports() -> list[str]:
    return [str(p) for p in sorted(VERIFIED.glob("*.json"))]


def load_reports(paths: list[str]) -> list[dict[str, Any]]:
    reports = []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not a conformance report: {type(e).__name__}: {e}") from None
        missing = [key for key in ("where", "date", "backends") if key not in report]
        if missing:
            raise UserError(f"{path} is not a conformance report: it lacks {', '.join(missing)}")
        reports.append(report)
    return reports
