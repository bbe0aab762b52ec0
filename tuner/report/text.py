"""How reports and progress lines write a duration (``1h23m45s``): one rule for the search's
lines, the plan, the leaderboard and the benchmarks."""

from __future__ import annotations


def format_seconds(seconds: float) -> str:
    """5025 -> '1h23m45s'; 42.3 -> '42s'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
