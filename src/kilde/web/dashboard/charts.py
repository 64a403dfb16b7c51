"""Charts drawn on the server as SVG: no script, no CDN, readable without colour.

Each chart is an `<svg role="img">` with a title for screen readers and a `<title>` on every
mark (the browser shows it on hover); the pages put the same figures in a table beside it.
Colours are the Okabe-Ito palette, which stays distinguishable with colour blindness.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
)


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _n(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _label(value: float) -> str:
    if abs(value) >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if abs(value) >= 10_000:
        return f"{value / 1000:.0f}k"
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.3g}"


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 2.5, 5, 10):
        top = step * magnitude
        if top >= value:
            return float(top)
    return float(value)


def _svg(width: int, height: int, title: str, body: str, kind: str = "") -> Markup:
    return Markup(
        f'<svg class="chart {kind}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>{body}</svg>'
    )


def legend(names: Sequence[str]) -> Markup:
    items = "".join(
        f'<li><span class="swatch" data-c="{i % len(PALETTE)}"></span>{escape(n)}</li>'
        for i, n in enumerate(names)
    )
    return Markup(f'<ul class="legend">{items}</ul>')


def stacked_bars(
    labels: Sequence[str], series: dict[str, Sequence[float]], title: str, height: int = 220
) -> Markup:
    """One bar per label (a day), stacked by series (a source or a channel)."""
    if not labels:
        return Markup('<p class="empty">No data yet.</p>')
    width, left, bottom, top = 760, 44, 24, 8
    plot_w, plot_h = width - left - 8, height - bottom - top
    totals = [sum(s[i] for s in series.values()) for i in range(len(labels))]
    peak = _nice_max(max(totals) if totals else 0)
    step = plot_w / len(labels)
    bar = max(step * 0.8, 1.0)
    parts: list[str] = []
    for tick in range(5):
        value = peak * tick / 4
        y = top + plot_h - plot_h * tick / 4
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - 8}" y1="{_n(y)}" y2="{_n(y)}"/>'
            f'<text class="axis" x="{left - 4}" y="{_n(y + 4)}" text-anchor="end">'
            f"{_label(value)}</text>"
        )
    names = list(series)
    for i, label in enumerate(labels):
        x = left + i * step + (step - bar) / 2
        y = top + plot_h
        for j, name in enumerate(names):
            value = series[name][i]
            if value <= 0:
                continue
            h = plot_h * value / peak
            y -= h
            parts.append(
                f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(bar)}" height="{_n(h)}" '
                f'fill="{colour(j)}"><title>{escape(label)} {escape(name)}: '
                f"{_label(value)}</title></rect>"
            )
    every = max(1, len(labels) // 8)
    for i in range(0, len(labels), every):
        x = left + i * step + step / 2
        parts.append(
            f'<text class="axis" x="{_n(x)}" y="{height - 6}" text-anchor="middle">'
            f"{escape(labels[i][5:])}</text>"
        )
    return _svg(width, height, title, "".join(parts), "wide")


def hbars(
    items: Sequence[tuple[str, float]],
    title: str,
    fmt: str = "{:g}",
    max_value: float | None = None,
) -> Markup:
    """Horizontal bars with their label and value, e.g. consent rate per purpose."""
    if not items:
        return Markup('<p class="empty">No data yet.</p>')
    row, label_w, width = 26, 150, 480
    height = row * len(items) + 8
    peak = max_value if max_value is not None else max(v for _, v in items) or 1.0
    parts: list[str] = []
    for i, (label, value) in enumerate(items):
        y = 4 + i * row
        w = (width - label_w - 60) * (value / peak if peak else 0)
        shown = fmt.format(value)
        parts.append(
            f'<text class="label" x="{label_w - 8}" y="{y + 16}" text-anchor="end">'
            f"{escape(label[:28])}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{_n(max(w, 1))}" height="{row - 8}" '
            f'fill="{colour(0)}"><title>{escape(label)}: {escape(shown)}</title></rect>'
            f'<text class="value" x="{_n(label_w + max(w, 1) + 6)}" y="{y + 16}">'
            f"{escape(shown)}</text>"
        )
    return _svg(width, height, title, "".join(parts), "bars")


def columns(items: Sequence[tuple[str, float]], title: str, height: int = 200) -> Markup:
    """Vertical bars, e.g. a distribution (histogram bins)."""
    if not items:
        return Markup('<p class="empty">No data yet.</p>')
    return stacked_bars([f"     {k}" for k, _ in items], {"": [v for _, v in items]}, title, height)


def heatmap(
    rows: Sequence[str],
    cols: Sequence[str],
    values: Sequence[Sequence[float | None]],
    title: str,
    fmt: str = "{:.0%}",
    max_value: float | None = None,
) -> Markup:
    """A grid of shaded cells with their value written in, e.g. retention by cohort and week."""
    if not rows or not cols:
        return Markup('<p class="empty">No data yet.</p>')
    cell_w, cell_h, left, top = max(34, min(64, 620 // max(len(cols), 1))), 26, 110, 22
    width = left + cell_w * len(cols) + 4
    height = top + cell_h * len(rows) + 4
    flat = [v for r in values for v in r if v is not None]
    peak = max_value if max_value is not None else (max(flat) if flat else 1.0) or 1.0
    parts: list[str] = []
    for j, col in enumerate(cols):
        parts.append(
            f'<text class="axis" x="{left + j * cell_w + cell_w / 2:.1f}" y="{top - 8}" '
            f'text-anchor="middle">{escape(str(col))}</text>'
        )
    for i, name in enumerate(rows):
        y = top + i * cell_h
        parts.append(
            f'<text class="axis" x="{left - 6}" y="{y + 17}" text-anchor="end">'
            f"{escape(str(name))}</text>"
        )
        for j, _ in enumerate(cols):
            value = values[i][j] if j < len(values[i]) else None
            x = left + j * cell_w
            if value is None:
                continue
            share = max(0.0, min(1.0, value / peak))
            level = min(5, int(share * 5.999))
            shown = fmt.format(value)
            parts.append(
                f'<rect class="heat h{level}" x="{x}" y="{y}" width="{cell_w - 2}" '
                f'height="{cell_h - 2}"><title>{escape(str(name))}, {escape(str(cols[j]))}: '
                f'{escape(shown)}</title></rect><text class="cell{" dark" if level >= 4 else ""}" '
                f'x="{x + (cell_w - 2) / 2:.1f}" y="{y + 16}" text-anchor="middle">'
                f"{escape(shown)}</text>"
            )
    return _svg(width, height, title, "".join(parts))


def line(points: Sequence[tuple[str, float]], title: str, height: int = 180) -> Markup:
    """A line over time, e.g. a segment's members after each refresh."""
    if not points:
        return Markup('<p class="empty">No data yet.</p>')
    width, left, bottom, top = 760, 44, 24, 10
    plot_w, plot_h = width - left - 12, height - bottom - top
    values = [v for _, v in points]
    low = min(0.0, min(values))
    peak = _nice_max(max(values) - low) + low
    span = (peak - low) or 1.0
    step = plot_w / max(len(points) - 1, 1)
    coords = [
        (left + i * step, top + plot_h - plot_h * (v - low) / span)
        for i, (_, v) in enumerate(points)
    ]
    parts: list[str] = []
    for tick in range(5):
        value = low + span * tick / 4
        y = top + plot_h - plot_h * tick / 4
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - 12}" y1="{_n(y)}" y2="{_n(y)}"/>'
            f'<text class="axis" x="{left - 4}" y="{_n(y + 4)}" text-anchor="end">'
            f"{_label(value)}</text>"
        )
    path = " ".join(f"{'M' if i == 0 else 'L'}{_n(x)},{_n(y)}" for i, (x, y) in enumerate(coords))
    parts.append(f'<path d="{path}" fill="none" stroke="{colour(0)}" stroke-width="2"/>')
    for (x, y), (label, value) in zip(coords, points, strict=True):
        parts.append(
            f'<circle cx="{_n(x)}" cy="{_n(y)}" r="3" fill="{colour(0)}">'
            f"<title>{escape(label)}: {_label(value)}</title></circle>"
        )
    every = max(1, len(points) // 6)
    for i in range(0, len(points), every):
        parts.append(
            f'<text class="axis" x="{_n(coords[i][0])}" y="{height - 6}" text-anchor="middle">'
            f"{escape(points[i][0])}</text>"
        )
    return _svg(width, height, title, "".join(parts))
