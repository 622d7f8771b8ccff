"""The report's "error against position" chart, fed by the records of conformance/test_position.py (those with a
'position' field): per quantity and dtype, the worst value over references and meshes at each start position."""
from __future__ import annotations

import io
import math
from typing import Any, Iterable, Mapping

POSITION_METRICS = ("rel_l2", "noise_ratio")

Series = dict[str, dict[tuple[str, str], dict[int, float]]]


def position_series(records: Iterable[Mapping[str, Any]]) -> Series:
    """metric -> (quantity, dtype) -> position -> worst value; NaN counts as +inf."""
    series: Series = {m: {} for m in POSITION_METRICS}
    for record in records:
        position = record.get("position")
        if position is None or not record.get("metrics"):
            continue
        for metric in POSITION_METRICS:
            if metric not in record["metrics"]:
                continue
            value = float(record["metrics"][metric])
            value = math.inf if math.isnan(value) else value
            line = series[metric].setdefault((str(record.get("quantity") or record["component"]), record["dtype"]),
                                             {})
            line[int(position)] = max(value, line.get(int(position), -math.inf))
    return series


def position_table(series: Series) -> list[dict[str, Any]]:
    """The chart's numbers as rows (quantity, dtype, metric, 'position: value' pairs), for the page's data table."""
    return [{"quantity": quantity, "dtype": dtype, "metric": metric,
             "points": ", ".join(f"{p}: {v:.3g}" for p, v in sorted(points.items()))}
            for metric, lines in series.items() for (quantity, dtype), points in sorted(lines.items())]


def position_chart(series: Series) -> str | None:
    """Error against position as inline SVG (x: start position + 1, log; y: log), one panel per metric, a line
    per (quantity, dtype); None when no record has a position."""
    if not any(series.values()):
        return None
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    quantities = sorted({q for lines in series.values() for q, _ in lines})
    colours = {q: f"C{i % 10}" for i, q in enumerate(quantities)}
    styles = {"float32": "-", "bfloat16": "--"}
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "parity-position", "font.size": 9}):
        figure = Figure(figsize=(11, 3.8), layout="constrained")
        FigureCanvasSVG(figure)
        axes = figure.subplots(1, len(POSITION_METRICS))
        for ax, metric in zip(axes, POSITION_METRICS):
            _panel(ax, metric, series[metric], colours, styles)
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), frameon=False)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def _panel(ax: Any, metric: str, lines: Mapping[tuple[str, str], Mapping[int, float]],
           colours: Mapping[str, str], styles: Mapping[str, str]) -> None:
    ax.set_title(f"{metric} against start position")
    ax.set_xlabel("start position + 1")
    ax.set_ylabel(metric)
    ax.set_xscale("log")
    finite = [v for line in lines.values() for v in line.values() if math.isfinite(v) and v > 0]
    low, high = (min(finite) / 10, max(finite) * 10) if finite else (1e-12, 1.0)
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    for (quantity, dtype), points in sorted(lines.items()):
        positions = sorted(points)
        ys = [min(max(points[p], low), high) for p in positions]
        (line,) = ax.plot([p + 1 for p in positions], ys, styles.get(dtype, ":"), color=colours[quantity],
                          marker="o", markersize=3, label=f"{quantity} · {dtype}")
        line.set_gid(f"position-{metric}-{quantity}-{dtype}")
    for edge in (2048, 8192):  # Llama 3.1's scaling band edges: original / high_freq_factor, / low_freq_factor
        ax.axvline(edge, color="0.6", linewidth=0.7, linestyle=":")
    if metric == "noise_ratio" and low <= 1.0 <= high:
        ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
    ax.grid(True, which="major", alpha=0.3)
