"""The papers' table: one row per attack, one column per defense, cells "(accuracy) success", mean ±
standard error over the trials."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional

from lightning_defense.core.store import atomic_write


def summarise(records: list[dict]) -> list[dict]:
    """Mean and standard error (std with ddof=1 over sqrt(T); None for one trial) per (attack, defense)."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        cells.setdefault((r["attack"], r["defense"]), []).append(r)
    summary = []
    for (attack, defense), rs in cells.items():
        entry = {"attack": attack, "defense": defense, "trials": len(rs), "kind": rs[0]["kind"]}
        for metric in ("accuracy", "success"):
            values = [r[metric] for r in rs if r[metric] is not None]
            mean, se = _mean_se(values)
            entry[f"{metric}_mean"], entry[f"{metric}_se"] = mean, se
        seconds = [r["victim_seconds"] for r in rs if r.get("victim_seconds") is not None]  # absent in old records
        entry["victim_seconds_mean"] = sum(seconds) / len(seconds) if seconds else None
        summary.append(entry)
    return summary


def _mean_se(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None  # one trial has no standard error
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def _pct(mean: Optional[float], se: Optional[float]) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" if se is None else f"{100 * mean:.1f}±{100 * se:.1f}"


def markdown_table(summary: list[dict]) -> str:
    """The papers' table: one row per attack, one column per defense, cells "(accuracy) success" in %."""
    attacks = list(dict.fromkeys(s["attack"] for s in summary))
    defenses = list(dict.fromkeys(s["defense"] for s in summary))
    lookup = {(s["attack"], s["defense"]): s for s in summary}
    lines = ["| attack | kind | " + " | ".join(defenses) + " |", "|---|---|" + "---|" * len(defenses)]
    for attack in attacks:
        kind = next((s["kind"] for s in summary if s["attack"] == attack), None) or "-"
        cells = []
        for d in defenses:
            s = lookup.get((attack, d))
            cells.append("" if s is None else f"({_pct(s['accuracy_mean'], s['accuracy_se'])}) "
                         f"{_pct(s['success_mean'], s['success_se'])}")
        lines.append(f"| {attack} | {kind} | " + " | ".join(cells) + " |")
    trials = max((s["trials"] for s in summary), default=0)
    lines.append("")
    spread = f"mean ± standard error over {trials} trials" if trials > 1 else "one trial (no standard error)"
    lines.append(f"Cells: (clean test accuracy %) attack success %, {spread}. "
                 "Success is the target→adversarial rate (targeted), the triggered→target rate (backdoor), "
                 "or the drop in test accuracy from the clean undefended model (indiscriminate).")
    times = []
    for d in defenses:
        seconds = [s["victim_seconds_mean"] for s in summary if s["defense"] == d and s.get("victim_seconds_mean")]
        if seconds:
            times.append(f"{d} {duration(sum(seconds) / len(seconds))}")
    if times:
        lines.append("Wall time per victim (the defense's data preparation and the fit), mean over the trained "
                     "cells of each column: " + ", ".join(times) + ".")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """A wall time for people: ``"4.2 s"``, ``"1 min 5 s"``, ``"2 h 3 min"`` (tables and the progress ETA)."""
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def write_tables(summary: list[dict], out: Path) -> str:
    """Write ``table.md``, ``table.csv`` and ``table.json`` into ``out``; returns the Markdown."""
    out = Path(out)
    text = markdown_table(summary)
    atomic_write(out / "table.md", text + "\n")
    atomic_write(out / "table.json", json.dumps(summary, indent=1))
    buffer = io.StringIO()
    fields = ["attack", "defense", "kind", "trials", "accuracy_mean", "accuracy_se", "success_mean", "success_se",
              "victim_seconds_mean"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(summary)
    atomic_write(out / "table.csv", buffer.getvalue())
    return text
