"""Progress bars for futures: ``fedexec.progress(futures)`` and ``ex.map(..., progress=True)``.

(Named progressbar, not progress, so that ``fedexec.progress`` is the function.)

A :class:`ProgressBar` counts tasks as their futures finish (done, and of
those how many failed or were cancelled) and draws one line with the counts
and the rate: through ``tqdm`` when it is installed, else a plain line of its
own. Futures report to it through ``add_done_callback``: a callback only adds
to the counts under a lock (it runs on the executor's background thread,
which must not wait on a terminal), and a small daemon thread of the bar's
redraws it at most ten times a second, and once more at the end.

It draws only on a terminal: when its file (standard error by default) is
not a TTY it draws nothing, so logs and pipes stay clean, unless it is
forced (``force=True``; ``ex.map(..., progress="force")``).

This module imports only the standard library (tqdm only when a bar is
drawn), and tasks without a bar pay nothing for it.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import Future, wait
from typing import IO, Any, Iterable

__all__ = ["ProgressBar", "progress", "progress_option"]

#: seconds between redraws at most
REFRESH = 0.1
#: the characters of the plain bar
_BAR_WIDTH = 24


def _is_tty(file: IO[str]) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):   # no isatty, or closed
        return False


def _load_tqdm() -> Any:
    """tqdm's class when tqdm is installed, else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """A one-line progress bar for tasks: done of total, failed, tasks/s.

    ``total``: the number of tasks (None: not known yet; :meth:`add_total`
    adds to it as tasks are submitted). ``file``: where to draw (default
    ``sys.stderr``). ``force``: draw even when ``file`` is not a terminal
    (by default nothing is drawn there). ``desc``: a label before the bar.
    ``use_tqdm``: None (the default) draws with tqdm when it is installed,
    False always with the plain bar.

    Use :meth:`track` for each future (a future may stand for several tasks,
    ``weight``: a chunk of ``map``), then :meth:`close` (or use it as a
    context manager), which draws the final counts and ends the line.
    """

    def __init__(self, total: int | None = None, *, file: IO[str] | None = None, force: bool = False,
                 desc: str | None = None, use_tqdm: bool | None = None) -> None:
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            raise ValueError(f"total must be None or a whole number >= 0, not {total!r}")
        self.file: IO[str] = file if file is not None else sys.stderr
        #: whether anything is drawn (a terminal, or forced)
        self.enabled: bool = bool(force) or _is_tty(self.file)
        self.desc = desc
        self.total = total
        #: tasks finished, and of those the ones that failed or were cancelled
        self.done = 0
        self.failed = 0
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._closed = False
        self._width = 0   # of the last plain line drawn, to blank what a shorter one leaves
        self._tqdm: Any = None
        self._thread: threading.Thread | None = None
        if not self.enabled:
            return
        tqdm_class = _load_tqdm() if use_tqdm is not False else None
        if tqdm_class is not None:
            self._tqdm = tqdm_class(total=total, file=self.file, desc=desc, unit="task", dynamic_ncols=True,
                                    leave=True, mininterval=REFRESH)
        self._thread = threading.Thread(target=self._run, name="fedexec-progress", daemon=True)
        self._thread.start()

    # -- counting (any thread) ------------------------------------------------
    def track(self, future: Future, weight: int = 1) -> Future:
        """Count ``future`` (as ``weight`` tasks) when it finishes; returns it."""
        future.add_done_callback(lambda f: self._finished(f, weight))
        return future

    def add_total(self, count: int) -> None:
        """``count`` more tasks to expect."""
        with self._lock:
            self.total = (self.total or 0) + count
        self._changed.set()

    def expect(self, future: Future, weight: int = 1) -> Future:
        """Add ``weight`` tasks to the total and count ``future`` as them when it finishes."""
        self.add_total(weight)
        return self.track(future, weight)

    def _finished(self, future: Future, weight: int) -> None:
        failed = future.cancelled() or future.exception() is not None
        with self._lock:
            self.done += weight
            if failed:
                self.failed += weight
        self._changed.set()

    # -- drawing (the bar's own thread) ---------------------------------------
    def _run(self) -> None:
        while not self._closed:
            self._changed.wait()
            if self._closed:
                return
            self._changed.clear()
            self._draw()
            time.sleep(REFRESH)

    def _counts(self) -> tuple[int, int, int | None, float]:
        with self._lock:
            return self.done, self.failed, self.total, time.monotonic() - self._start

    def _draw(self, final: bool = False) -> None:
        done, failed, total, elapsed = self._counts()
        if self._tqdm is not None:
            bar = self._tqdm
            if total is not None and bar.total != total:
                bar.total = total
            bar.set_postfix_str(f"{failed} failed", refresh=False)
            bar.update(done - bar.n)   # redraws (at most every REFRESH); close() draws the last state
            return
        rate = done / elapsed if elapsed > 0 else 0.0
        label = f"{self.desc}: " if self.desc else ""
        if total:
            filled = min(_BAR_WIDTH, _BAR_WIDTH * done // total)
            bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
            line = f"{label}{100 * done // total:3d}% |{bar}| {done}/{total} done, {failed} failed"
        else:
            line = f"{label}{done} done, {failed} failed"
        line += f", {rate:.1f} tasks/s, {_elapsed(elapsed)}"
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        try:
            self.file.write("\r" + line + pad + ("\n" if final else ""))
            self.file.flush()
        except (OSError, ValueError):   # the terminal went away: stop drawing
            self.enabled = False
            self._closed = True

    def close(self) -> None:
        """Draw the final counts and end the line; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        if self._thread is not None:
            self._thread.join()
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._draw()
            self._tqdm.close()   # draws the last state and ends the line
        else:
            self._draw(final=True)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(futures: Iterable[Future], *, file: IO[str] | None = None, force: bool = False,
             desc: str | None = None) -> list[Future]:
    """Wait for ``futures`` to finish while drawing a progress bar of them
    (done and failed counts, tasks per second) on ``file`` (default standard
    error); returns them as a list, in the order given.

    As with ``concurrent.futures.wait``, a failed future does not stop the
    wait: it is counted as failed, and its exception stays on the future.
    Nothing is drawn when ``file`` is not a terminal unless ``force``.
    """
    futures = list(futures)
    with ProgressBar(len(futures), file=file, force=force, desc=desc) as bar:
        for future in futures:
            bar.track(future)
        wait(futures)
    return futures


def progress_option(value: Any) -> ProgressBar | None:
    """The bar for ``map``'s ``progress`` argument, with a total of 0 (``map``
    adds its tasks as it submits them): False/None: none; True: on standard
    error if it is a terminal (else none); "force": on standard error always.
    ValueError for anything else."""
    if value is None or value is False:
        return None
    if value is not True and not (isinstance(value, str) and value == "force"):
        raise ValueError(f"progress must be True, False or 'force' (draw even when standard error is not a "
                         f"terminal), not {value!r}")
    bar = ProgressBar(0, force=value == "force")
    return bar if bar.enabled else None
