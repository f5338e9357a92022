"""Optional dependency groups (pip extras) that parts of the zoo need, and the message when one is missing."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable


def missing_extra(model: str, extra: str, modules: Iterable[str], install: str) -> str | None:
    """None when every one of `modules` (what the pip extra `extra` brings) is importable, else the message that
    `model` needs the extra: which modules are missing and the `install` command."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"{model} needs the '{extra}' extra ({', '.join(missing)} not installed); install it: {install}"
