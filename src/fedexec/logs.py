"""How the relay, endpoint and pool processes log.

Each logs to stderr (which a daemon's starter points at its log file) and,
run in the foreground, also to its log file, so that what a relay said is in
``relay.log`` however it was started. A line repeated within a minute (an
endpoint retrying a relay that refuses it, a reconnect every heartbeat) is
written once; when another line comes, or a minute has passed, one line says
how many times it was repeated. The log files are private to the user
(0600), as everything fedexec writes.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from pathlib import Path


FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
REPEAT_WINDOW = 60.0   # seconds a repeated line stays collapsed before it is written again


class RepeatCollapser(logging.Filter):
    """A handler's filter that drops a record repeating the one before it
    (same logger, level and text) within ``window`` seconds, and writes,
    before the next different record (or the first repeat past the window),
    how many were dropped."""

    def __init__(self, handler: logging.Handler, window: float = REPEAT_WINDOW) -> None:
        super().__init__()
        self.handler = handler
        self.window = window
        self.last: tuple[str, int, str] | None = None
        self.last_record: logging.LogRecord | None = None
        self.shown_at = 0.0
        self.repeats = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key == self.last and record.created - self.shown_at < self.window:
            self.repeats += 1
            return False
        self._flush_repeats(record.created)
        self.last, self.last_record, self.shown_at = key, record, record.created
        return True

    def _flush_repeats(self, now: float) -> None:
        if self.repeats and self.last_record is not None:
            previous = self.last_record
            note = logging.LogRecord(previous.name, previous.levelno, previous.pathname, previous.lineno,
                                     "(the line above was repeated %d more time%s in %.0f s)",
                                     (self.repeats, "" if self.repeats == 1 else "s", now - self.shown_at),
                                     None)
            note.created = now
            note.msecs = (now % 1) * 1000
            self.handler.emit(note)   # (past the filter: it is not a repeat)
        self.repeats = 0


def configure(level: str | int = "INFO", log_file: Path | None = None) -> None:
    """Log at ``level`` to stderr and, if given, to ``log_file`` too
    (appended; made private first), collapsing repeated lines in each."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.StreamHandler(_open_private_log(log_file)))
    formatter = logging.Formatter(FORMAT)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(RepeatCollapser(handler))
    logging.basicConfig(level=level, handlers=handlers, force=True)
    atexit.register(flush_repeats)   # (runs before logging's own shutdown, registered earlier)


def _open_private_log(path: Path):
    """``path`` opened to append, private (0600): missing parent directories
    are made 0700, an existing one is left as it is (a log may go in a
    shared directory such as /tmp, whose mode is not ours to change), and a
    symlink in the file's place is refused, not followed."""
    path = Path(path)
    missing = [parent for parent in [path.parent, *path.parent.parents] if not parent.exists()]
    for parent in reversed(missing):
        parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


def flush_repeats() -> None:
    """Write the pending "repeated" notes (at exit: the count is not lost)."""
    now = time.time()
    for handler in logging.getLogger().handlers:
        for filt in handler.filters:
            if isinstance(filt, RepeatCollapser):
                filt._flush_repeats(now)
