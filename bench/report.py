"""Writing a scenario's results: JSON (everything), a markdown table (what a reader compares) and
PNG plots (matplotlib, optional: without it the plots are skipped with a printed reason)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def machine_line(machine: dict) -> str:
    v = machine["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in sorted(v))
    return (
        f"Machine: {machine['cpu']} ({machine.get('cpu_kind', 'CPU kind not recorded')}), "
        f"{machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"{machine['platform']}, Python {machine['python']}; {versions}"
    )


def table(headers: list[str], rows: list[list]) -> str:
    def cell(x) -> str:
        if x is None:
            return "—"
        if isinstance(x, float):
            return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def model_table(m: dict, headers: list[str], rows: list[list]) -> list[str]:
    """A model's results: its heading, with the load average they were taken under (a busy
    machine shows here), and the table."""
    load = ", ".join(f"{x:.2f}" for x in m["load_average"])
    return [f"\n#### model {m['model']} (load average at the end {load})\n", table(headers, rows)]


def target(name: str, value: float | None, goal: float, why: str) -> dict:
    """A speed-up against a goal; `why` says what is missing when value is None."""
    return {"name": name, "value": value, "target": goal, "why": why}


def target_lines(targets: list[dict]) -> list[str]:
    """'- name: 12.3x (target 20x): not met' for each target."""
    out = []
    for t in targets:
        if t["value"] is None:
            out.append(f"- {t['name']}: not measured ({t['why']})")
        else:
            met = "met" if t["value"] >= t["target"] else "not met"
            out.append(f"- {t['name']}: {t['value']:.2f}x (target {t['target']}x): {met}")
    return out


def write(
    out_dir: Path | None,
    name: str,
    result: dict,
    markdown: str,
    plot: Callable[[dict, object], None],
) -> list[str]:
    """Write NAME.json, NAME.md and NAME.png into out_dir; returns what was written or why not."""
    if out_dir is None:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown + "\n")
    written = [str(out_dir / f"{name}.json"), str(out_dir / f"{name}.md")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [*written, "no plots: matplotlib is not installed (pip install 'facert[bench]')"]
    fig = plt.figure(figsize=(11, 4.5), layout="constrained")
    plot(result, fig)
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)
    return [*written, str(out_dir / f"{name}.png")]
