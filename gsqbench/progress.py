"""Progress that reads well in a terminal and in a log file, and warnings said once.

- `stage(...)`: one line per finished stage of a run with its elapsed time (`[2/4] vq-s0 trained 200 steps in 47 s`),
  on the `gsqbench.progress` logger, which the CLI shows at INFO level without a prefix.
- `Progress`: a long loop's progress. On a terminal a tqdm bar (erased when done); when stderr is not a terminal
  (`make demo > log`, CI, a batch job) one plain line per 10 % instead, so a log is neither silent nor flooded.
- `CliLogging`: the CLI's stderr handler. Each distinct warning is printed the first time only; at the end one line
  per repeated warning gives its count. Python `warnings` go through the same path.

Library code only logs; nothing here prints except through the handler the CLI installs.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Mapping, Optional, TextIO

PROGRESS_LOGGER = "gsqbench.progress"
log = logging.getLogger(PROGRESS_LOGGER)


def fmt_seconds(seconds: float) -> str:
    """47 s, 3 min 12 s, 2 h 05 min."""
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def stage(message: str, *args: Any) -> None:
    """One line for a finished (or skipped) stage; `message` is %-formatted with `args` like logging."""
    log.info(message, *args)


def stream_is_terminal(stream: Optional[TextIO] = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """`update(n)`, `set_postfix(dict)`, `close()` like tqdm; a bar on a terminal, 10 % lines otherwise."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, initial: int = 0, unit: str = "it"):
        self.total, self.desc, self.unit = max(0, int(total)), desc, unit
        self.n = int(initial)
        self._t0 = time.perf_counter()
        self._start = self.n
        self._postfix: dict[str, Any] = {}
        self._bar: Any = None
        self._lines = enabled and not stream_is_terminal()
        self._next_decile = self._decile(self.n) + 1
        if enabled and not self._lines:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def _decile(self, n: int) -> int:
        return 10 * n // self.total if self.total else 10

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self._lines or not self.total:
            return
        decile = self._decile(self.n)
        if decile >= self._next_decile:
            self._next_decile = decile + 1
            elapsed = time.perf_counter() - self._t0
            extra = "".join(f", {k} {v}" for k, v in self._postfix.items())
            log.info("%s: %d/%d %s (%d %%) after %s%s", self.desc, self.n, self.total, self.unit,
                     min(100, 100 * self.n // self.total), fmt_seconds(elapsed), extra)

    def set_postfix(self, values: Mapping[str, Any]) -> None:
        self._postfix = dict(values)
        if self._bar is not None:
            self._bar.set_postfix(self._postfix)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ----------------------------------------------------------------------------------------------- CLI handler
class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == PROGRESS_LOGGER:
            return record.getMessage()
        return f"{record.levelname} {record.name}: {record.getMessage()}"


class _OncePerMessage(logging.Filter):
    """Lets the first record of each distinct (level, logger, message) through and counts the repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[tuple[int, str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.levelno, record.name, record.getMessage())
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key] == 1


class CliLogging:
    """Install (`start`) and remove (`finish`) the CLI's stderr logging; `finish` prints the repeat counts.

    When the host already configured logging (root has handlers: an embedding application, pytest), nothing is
    installed, like `logging.basicConfig`.
    """

    def __init__(self, verbosity: int = 0, stream: Optional[TextIO] = None):
        self.level = [logging.WARNING, logging.INFO, logging.DEBUG][min(max(verbosity, 0), 2)]
        self.stream = stream
        self.handler: Optional[logging.Handler] = None
        self.once = _OncePerMessage()
        self._saved: list[tuple[logging.Logger, int]] = []

    def start(self) -> "CliLogging":
        root = logging.getLogger()
        if root.handlers:
            return self
        self.handler = logging.StreamHandler(self.stream if self.stream is not None else sys.stderr)
        self.handler.setFormatter(_Formatter())
        self.handler.addFilter(self.once)
        for logger, level in ((root, self.level), (logging.getLogger(PROGRESS_LOGGER), logging.INFO)):
            self._saved.append((logger, logger.level))
            logger.setLevel(min(level, logger.level) if logger.level else level)
        root.addHandler(self.handler)
        logging.captureWarnings(True)
        return self

    def repeats(self) -> list[str]:
        """'(given N times) logger: message' for every warning that was suppressed at least once."""
        out = []
        for (_, name, message), count in self.once.counts.items():
            if count > 1:
                short = message if len(message) <= 110 else message[:107] + "..."
                out.append(f"(the warning above was given {count} times) {name}: {short}")
        return out

    def finish(self) -> None:
        if self.handler is None:
            return
        for line in self.repeats():
            self.handler.stream.write(line + "\n")
        self.handler.flush()
        logging.getLogger().removeHandler(self.handler)
        logging.captureWarnings(False)
        for logger, level in self._saved:
            logger.setLevel(level)
        self.handler = None
