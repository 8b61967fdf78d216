"""Summarise measurements and render them: plain-text tables, Markdown, a PNG bar chart."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from harness import Measurement

BASELINE = "leasetree-sqlite"


@dataclass
class Row:
    """One contender in one table, summarised over its repeats."""

    name: str
    tasks: int
    note: str
    rates: list[float] = field(default_factory=list)  # tasks/s of each successful repeat
    cpu_per_1k: list[float] = field(default_factory=list)
    peak_rss: int = 0
    first_secs: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)  # latency table only

    def add(self, m: Measurement) -> None:
        for note in m.notes:
            if note not in self.notes:
                self.notes.append(note)
        if m.error:
            self.errors.append(m.error)
            return
        assert m.wall_secs is not None and m.cpu_secs is not None
        self.rates.append(self.tasks / m.wall_secs)
        self.cpu_per_1k.append(m.cpu_secs / self.tasks * 1000)
        self.peak_rss = max(self.peak_rss, m.peak_rss)
        if m.first_secs is not None:
            self.first_secs.append(m.first_secs)

    @property
    def median_rate(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _fmt_ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def _fmt_small(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def _error_cell(row: Row) -> str:
    return f"error: {row.errors[0]}"


Table = tuple[list[str], list[list[str]]]


def throughput_table(rows: list[Row], sleep_ms: float = 0.0, workers: int = 2) -> Table:
    """Header and cells of a throughput table; with ``sleep_ms`` it adds the overhead share."""
    base = next((r.median_rate for r in rows if r.name == BASELINE), None)
    header = ["contender", "tasks", "tasks/s (median)", "min–max", f"× {BASELINE}", "CPU s / 1k tasks",
              "peak RSS MB", "first done s"]
    if sleep_ms:
        header.append("overhead")
    cells = []
    for row in rows:
        rate = row.median_rate
        if rate is None:
            cells.append([row.name, str(row.tasks), _error_cell(row)] + [""] * (len(header) - 3))
            continue
        line = [row.name, str(row.tasks), _fmt_rate(rate),
                f"{_fmt_rate(min(row.rates))}–{_fmt_rate(max(row.rates))}",
                _fmt_ratio(rate / base) if base else "n/a",
                _fmt_small(statistics.median(row.cpu_per_1k)),
                f"{row.peak_rss / 2**20:.0f}",
                f"{statistics.median(row.first_secs):.2f}" if row.first_secs else "–"]
        if sleep_ms:
            ideal = workers * 1000.0 / sleep_ms
            line.append(f"{max(0.0, 1 - rate / ideal):.0%}")
        cells.append(line)
    return header, cells


def latency_table(rows: list[Row]) -> Table:
    header = ["contender", "samples", "p50 ms", "p99 ms", "max ms"]
    cells = []
    for row in rows:
        if not row.latency_ms:
            cells.append([row.name, "0", _error_cell(row) if row.errors else "no samples", "", ""])
            continue
        ordered = sorted(row.latency_ms)
        p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
        cells.append([row.name, str(len(ordered)), f"{statistics.median(ordered):.1f}", f"{p99:.1f}",
                      f"{ordered[-1]:.1f}"])
    return header, cells


def footnotes(rows: list[Row]) -> list[str]:
    lines = []
    for row in rows:
        extra = list(row.notes)
        if row.rates and row.errors:
            extra.append(f"{len(row.errors)} failed repeat(s): {row.errors[0]}")
        lines.append(f"{row.name}: {'; '.join([row.note, *extra]) if extra else row.note}")
    return lines


def _is_error(cells: list[str]) -> bool:
    return cells[2].startswith("error:") or cells[2] == "no samples"


def render_text(title: str, header: list[str], cells: list[list[str]], notes: list[str]) -> str:
    # an error message sits in the third column and runs past the others: it sets no width
    measured = [c for c in cells if not _is_error(c)]
    widths = [max([len(h), *(len(c[i]) for c in (cells if i < 2 else measured))])
              for i, h in enumerate(header)]
    out = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
           "  ".join("-" * w for w in widths)]
    for c in cells:
        if _is_error(c):
            out.append(f"{c[0].ljust(widths[0])}  {c[1].ljust(widths[1])}  {c[2]}")
        else:
            out.append("  ".join(v.rjust(w) if i else v.ljust(w)
                                 for i, (v, w) in enumerate(zip(c, widths, strict=True))).rstrip())
    out.append("notes:")
    out += [f"  {n}" for n in notes]
    return "\n".join(out)


def render_markdown(title: str, header: list[str], cells: list[list[str]], notes: list[str]) -> str:
    out = [f"### {title}", "", "| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(v.replace("|", "\\|") for v in c) + " |" for c in cells]
    out += ["", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


def write_png(path: Path, charts: list[tuple[str, list[Row]]]) -> None:
    """One horizontal bar per contender (median tasks/s, min–max whiskers), one panel per table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, [r for r in rows if r.rates]) for t, rows in charts]
    panels = [(t, rows) for t, rows in panels if rows]
    if not panels:
        return
    height = sum(1.0 + 0.35 * len(rows) for _, rows in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, max(3.0, height)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], panels, strict=True):
        rows = sorted(rows, key=lambda r: r.median_rate or 0)
        medians = [r.median_rate or 0 for r in rows]
        errs = [[m - min(r.rates) for m, r in zip(medians, rows, strict=True)],
                [max(r.rates) - m for m, r in zip(medians, rows, strict=True)]]
        colors = ["tab:orange" if r.name.startswith("leasetree") else "tab:blue" for r in rows]
        ax.barh([r.name for r in rows], medians, xerr=errs, color=colors, capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel("tasks/s (log scale; median, whiskers min–max)")
        ax.set_title(title, fontsize=10)
        for y, (m, r) in enumerate(zip(medians, rows, strict=True)):
            ax.text(max(r.rates) * 1.08, y, _fmt_rate(m), va="center", fontsize=8)
        ax.set_xlim(right=max(max(r.rates) for r in rows) * 4)  # room for the last label
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
