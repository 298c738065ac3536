""""did you mean ...?" for names a user types (methods, presets, passes): one helper, one wording."""

from __future__ import annotations

from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """"did you mean 'X'? " when `name` is close to one of `choices` (difflib, cutoff 0.6), else ""."""
    import difflib

    close = difflib.get_close_matches(name.lower(), list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""
