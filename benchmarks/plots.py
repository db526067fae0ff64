"""PNG plots of each failover timeline: latency and serving endpoint over send time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.openloop import Timeline

COLOURS = {"primary": "tab:blue", "dr": "tab:orange"}
LANES = {"failed": 0, "dr": 1, "primary": 2}


def plot(timeline: Timeline, title: str, path: Path) -> None:
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(9, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for label, colour in [*COLOURS.items(), ("failed", "tab:red")]:
        chosen = [
            s
            for s in timeline.samples
            if (s.failed if label == "failed" else (not s.failed and s.served_by == label))
        ]
        xs = [s.sent_s for s in chosen]
        top.scatter(xs, [max(s.latency_s * 1000, 0.05) for s in chosen], s=3, c=colour, label=label)
        bottom.scatter(xs, [LANES[label]] * len(xs), s=3, c=colour)
    for index, (name, at) in enumerate(sorted(timeline.events.items(), key=lambda e: e[1])):
        for axis in (top, bottom):
            axis.axvline(at, color="black", linestyle="--", linewidth=0.8)
        height = 1 - 0.07 * index  # events close together stay readable
        top.annotate(name, (at, height), xycoords=("data", "axes fraction"), va="top")
    top.set_yscale("log")
    top.set_ylabel("latency (ms)")
    top.set_title(title)
    top.legend(loc="upper right", markerscale=4)
    bottom.set_yticks(list(LANES.values()), list(LANES))
    bottom.set_ylim(-0.5, 2.5)
    bottom.set_xlabel("seconds since the stream started (send time)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_all(out: Path, timelines: dict[str, Timeline]) -> list[str]:
    """One PNG per timeline (``failover-<scenario>-<proxy>.png``) in ``out``; their names."""
    written = []
    for name, timeline in timelines.items():
        path = out / f"failover-{name}.png"
        plot(timeline, f"{name}: latency and serving endpoint", path)
        written.append(path.name)
    return written
