"""The server's log: one record per distinct message per window, so that a loop failing
every poll (a full disk, a database away) cannot flood the log, or fill the disk further.
"""

from __future__ import annotations

import logging
import threading
import time

REPEAT_WINDOW = 60.0  # seconds an identical message stays quiet after it was logged


class RepeatFilter(logging.Filter):
    """Drops a record identical to one logged less than ``window`` seconds ago (same
    logger, level, message and exception); the next one that passes says how many were
    dropped. Distinct messages (another job, another error) always pass."""

    def __init__(self, window: float = REPEAT_WINDOW) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[tuple, tuple[float, int]] = {}  # key -> (last logged, dropped since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        key = (record.name, record.levelno, record.getMessage(), repr(error))
        now = time.monotonic()
        with self._lock:
            last, dropped = self._seen.get(key, (-float("inf"), 0))
            if now - last < self.window:
                self._seen[key] = (last, dropped + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > 10_000:  # forget the oldest: memory stays bounded
                for stale in sorted(self._seen, key=lambda k: self._seen[k][0])[:5_000]:
                    del self._seen[stale]
        if dropped:
            record.msg = f"{record.msg} ({dropped} identical messages in the last {self.window:g} s not logged)"
        return True


def configure(level: str) -> None:
    """Log to stderr with timestamps, through a :class:`RepeatFilter`."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RepeatFilter())
