"""User-facing errors: one line naming the field or file, the bad value and what is valid (CLI exit code 2)."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint, CLI). The CLI prints it as one line, exit code 2."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return a '; did you mean 'x'?' suffix (or a list of valid choices) for an unknown name."""
    choices = sorted(choices)
    close = difflib.get_close_matches(value, choices, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid: {', '.join(choices) if choices else '(none)'}"
