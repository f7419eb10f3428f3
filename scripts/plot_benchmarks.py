"""Draw the plots of docs/benchmarks.md from the measured tables on that page.

    python scripts/plot_benchmarks.py          # writes docs/img/*.png

The numbers come from the markdown tables themselves (found by the heading above them), so
a plot never shows a number the page does not state with its command and machine.
"""
from __future__ import annotations

import pathlib
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
OUT = ROOT / "docs" / "img"


def table_after(text: str, heading: str) -> list[list[str]]:
    """The rows (cells as strings) of the first markdown table after ``## heading``."""
    section = text.split(f"## {heading}\n", 1)[1]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    start = section.splitlines().index(lines[0])
    rows = []
    for ln in section.splitlines()[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return [r for r in rows if not re.fullmatch(r"[-:| ]+", "|".join(r))]


def number(cell: str) -> float | None:
    cell = cell.replace("*", "")
    return None if cell in ("–", "-", "") else float(cell.split()[0])


def memory_per_rank(text: str) -> None:
    header, *rows = table_after(text, "Memory per rank")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for col, name in enumerate(header[1:], start=1):
        pts = [(int(r[0]), number(r[col])) for r in rows if number(r[col]) is not None]
        ax.plot([p for p, _ in pts], [m for _, m in pts], marker="o", label=name.replace(" peak MiB/rank", ""))
    ax.set_xlabel("ranks P")
    ax.set_xticks([int(r[0]) for r in rows])
    ax.set_ylabel("peak MiB per rank")
    ax.set_title("Attention memory per rank, 8K tokens (CPU, fp32)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "memory_per_rank.png", dpi=120)


def packed_balance(text: str) -> None:
    header, *rows = table_after(text, "Packed documents")
    worlds = [int(h.split("=")[1]) for h in header[1:]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in rows:
        means = [number(c.split("/")[0]) for c in r[1:]]
        ax.plot(worlds, means, marker="o", label=r[0], ls="--" if r[0] == "striped" else "-")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("ranks P")
    ax.set_xticks(worlds)
    ax.set_ylabel("max / mean causal work per rank")
    ax.set_title("Packed log-normal documents, 128K tokens (mean of 20)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "packed_balance.png", dpi=120)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    text = PAGE.read_text()
    memory_per_rank(text)
    packed_balance(text)
    print(f"wrote {OUT / 'memory_per_rank.png'}, {OUT / 'packed_balance.png'}")


if __name__ == "__main__":
    main()
