"""The case report's timeline plot: the captured walk's file changes per hour as an inline SVG, with the
moments the suspicious processes started marked on it.

Invariants: one self-contained <svg> (no script, no external font or link), text escaped; a square-root
scale said in the caption (a package upgrade's thousands of changes must not flatten an attacker's dozen).
"""
from __future__ import annotations

import html
import math
import time
from typing import Any, Dict, List, Optional

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 900, 240, 48, 36, 14


def _label(moment: float, fmt: str) -> str:
    return time.strftime(fmt, time.gmtime(moment))


def svg(changes_per_hour: Dict[str, int], until: float, days: int, marks: List[Dict[str, Any]]) -> Optional[str]:
    """changes_per_hour: {epoch hour: count}; marks: [{time, label}]. None when there is nothing to draw."""
    if not changes_per_hour:
        return None
    start = (int(until) // 3600 - days * 24 + 1) * 3600
    hours = days * 24
    counts = [int(changes_per_hour.get(str(start + i * 3600), 0)) for i in range(hours)]
    peak = max(counts) or 1
    plot_width, plot_height = WIDTH - LEFT - 10, HEIGHT - BOTTOM - TOP
    step = plot_width / hours
    parts = ['<svg class="timeline" width="%d" height="%d" viewBox="0 0 %d %d" '
             'role="img" aria-label="file changes per hour">' % (WIDTH, HEIGHT, WIDTH, HEIGHT),
             '<rect x="%d" y="%d" width="%d" height="%d" fill="#fafafa" stroke="#bbb"/>' % (
                 LEFT, TOP, plot_width, plot_height)]
    for index, count in enumerate(counts):
        if not count:
            continue
        bar = plot_height * math.sqrt(count / peak)
        parts.append('<rect x="%.1f" y="%.1f" width="%.2f" height="%.1f" fill="#4a6fa5"><title>%s: %d changes'
                     '</title></rect>' % (LEFT + index * step, TOP + plot_height - bar, max(step - 0.3, 0.6), bar,
                                           _label(start + index * 3600, "%Y-%m-%d %H:00Z"), count))
    for day in range(days + 1):
        x = LEFT + day * 24 * step
        parts.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>' % (x, TOP, x, TOP + plot_height))
        if day % 2 == 0 and day < days:
            parts.append('<text x="%.1f" y="%d" font-size="10" fill="#333">%s</text>' % (
                x + 2, HEIGHT - BOTTOM + 14, _label(start + day * 86400, "%m-%d")))
    parts.append('<text x="4" y="%d" font-size="10" fill="#333">%d</text>' % (TOP + 10, peak))
    parts.append('<text x="4" y="%d" font-size="10" fill="#333">0</text>' % (TOP + plot_height))
    for number, mark in enumerate(marks[:20]):
        moment = mark.get("time")
        if not moment or not start <= moment <= start + hours * 3600:
            continue
        x = LEFT + (moment - start) / 3600 * step
        parts.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#c00" stroke-width="1.5"><title>%s</title>'
                     '</line>' % (x, TOP, x, TOP + plot_height, html.escape(mark.get("label", ""))))
        parts.append('<text x="%.1f" y="%d" font-size="9" fill="#c00">%d</text>' % (
            x + 2, TOP + 10 + (number % 4) * 10, number + 1))
    parts.append('<text x="%d" y="%d" font-size="10" fill="#555">UTC, the last %d days; bar height: square root '
                 'of the count; red: a suspicious process started</text>' % (LEFT, HEIGHT - 6, days))
    parts.append("</svg>")
    return "".join(parts)
