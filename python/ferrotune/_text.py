"""Small helpers for the words in ferrotune's messages."""

from __future__ import annotations

from typing import Optional


def plural(n: int, word: str, many: Optional[str] = None) -> str:
    """``"1 row"``, ``"0 rows"``, ``"2000 rows"``; ``many`` for irregular words."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def singular_unit(n: int, unit: str) -> str:
    """A progress unit that the core names in the plural (``"rows"``, ``"files"``,
    ``"steps"``, ``"tokens"``) for ``n`` of them: ``"1 row"``, ``"3 rows"``."""
    if n == 1 and unit.endswith("s") and len(unit) > 1:
        return f"{n:,} {unit[:-1]}"
    return f"{n:,} {unit}".rstrip()
