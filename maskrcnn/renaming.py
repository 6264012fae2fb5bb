"""State-dict key renaming by ordered regex rules, shared by the torchvision and Detectron2 importers.

A rule is (pattern, replacement); the first rule whose pattern matches renames the key, and a
replacement may be a function of the match. No torch and no maskrcnn imports: any layer may use it.
"""

from __future__ import annotations

import re
from typing import Callable

Replacement = str | Callable[[re.Match[str]], str]
Rules = list[tuple[re.Pattern[str], Replacement]]


def compile_rules(rules: list[tuple[str, Replacement]]) -> Rules:
    """Return the rules with their patterns compiled."""
    return [(re.compile(pattern), replacement) for pattern, replacement in rules]


def rename_key(key: str, rules: Rules) -> str | None:
    """Return `key` renamed by the first rule whose pattern matches, or None when none does."""
    for pattern, replacement in rules:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    return None
