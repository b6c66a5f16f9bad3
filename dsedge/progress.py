"""Progress of the long loops: compress layers, export layers, validation checks, index embedding batches.

Library code never prints: a loop opens a bar and advances it,

    with progress("compress", total=n, unit="layer") as bar:
        for i in range(n):
            ...
            bar.advance(detail="SQNR min 31.2 dB")

and the installed :class:`Renderer` decides what that looks like. The default logs plain lines on the
``dsedge.progress`` logger (``compress: layer 3/12, 1.2 s/layer, ETA 11 s``), so a library user sees them
through logging as they see everything else. The CLI installs one for the terminal (:func:`use_renderer`):
tqdm bars when stderr is a terminal, the plain lines when it is not, nothing with ``-q``/``--json``.

No third-party dependency: tqdm is imported only by :class:`TqdmRenderer` (the CLI falls back to plain lines
where it is missing, as in a runtime-only install that lacks it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

log = logging.getLogger("dsedge.progress")

# Plain lines: every step of a short loop (compress/export layers), at most one a second for a long one
# (embedding batches), and always the last.
EVERY_STEP_UP_TO = 50
LINE_INTERVAL_S = 1.0
_clock = time.perf_counter  # read once per step (tests replace it)


class Bar:
    """One loop's progress: ``total`` steps of ``unit`` in ``stage``; the renderer draws it."""

    def __init__(self, stage: str, total: int, unit: str, renderer: Renderer):
        self.stage, self.total, self.unit = stage, max(0, int(total)), unit
        self.done = 0
        self.detail: str | None = None
        self.started = self.updated = _clock()
        self._renderer = renderer
        self._state: Any = None  # the renderer's own (a tqdm bar, the time of the last line)

    def advance(self, steps: int = 1, detail: str | None = None) -> None:
        """``steps`` more done; ``detail`` says something about the latest (shown beside the count)."""
        self.done = min(self.total, self.done + steps) if self.total else self.done + steps
        self.detail, self.updated = detail, _clock()
        self._renderer.update(self)

    @property
    def elapsed_s(self) -> float:
        """Seconds from the start to the latest step."""
        return self.updated - self.started

    @property
    def seconds_per_step(self) -> float | None:
        return self.elapsed_s / self.done if self.done else None

    @property
    def eta_s(self) -> float | None:
        rate = self.seconds_per_step
        return rate * (self.total - self.done) if rate is not None and self.total else None

    def line(self) -> str:
        """``compress: layer 3/12, 1.2 s/layer, ETA 11 s (detail)``."""
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        parts = [f"{self.stage}: {self.unit} {count}"]
        rate = self.seconds_per_step
        if rate is not None:
            parts.append(f"{rate:.1f} s/{self.unit}" if rate >= 1 else f"{1 / max(rate, 1e-9):,.1f} {self.unit}s/s")
            if self.done < self.total:
                parts.append(f"ETA {format_duration(self.eta_s or 0.0)}")
            else:
                parts.append(f"done in {format_duration(self.elapsed_s)}")
        text = ", ".join(parts)
        return f"{text} ({self.detail})" if self.detail else text


def format_duration(seconds: float) -> str:
    """``11 s``, ``0.4 s``, ``2 min 05 s``, ``1 h 03 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Renderer:
    """How bars are shown. ``start``/``close`` bracket a bar, ``update`` follows every ``advance``."""

    def start(self, bar: Bar) -> None:
        pass

    def update(self, bar: Bar) -> None:
        pass

    def close(self, bar: Bar) -> None:
        pass


class Silent(Renderer):
    """Nothing (``-q``, ``--json``)."""


class PlainLines(Renderer):
    """Plain lines, on the ``dsedge.progress`` logger (the default) or written to ``stream``."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream

    def update(self, bar: Bar) -> None:
        due = bar.total <= EVERY_STEP_UP_TO or bar._state is None or bar.updated - bar._state >= LINE_INTERVAL_S
        if due or bar.done >= bar.total:
            bar._state = bar.updated
            self._emit(bar.line())

    def _emit(self, text: str) -> None:
        if self.stream is None:
            log.info("%s", text)
        else:
            print(text, file=self.stream, flush=True)


class TqdmRenderer(Renderer):
    """tqdm bars on ``stream`` (a terminal): count, rate, ETA, the latest detail as postfix."""

    def __init__(self, stream: IO[str]):
        import tqdm  # optional: only a terminal renderer needs it

        self._tqdm, self.stream = tqdm.tqdm, stream

    def start(self, bar: Bar) -> None:
        # A pty not sized yet (`script`, some CI runners) says 0 x 0: tqdm would then draw nothing at all.
        sized = {"dynamic_ncols": True} if _sized(self.stream) else {"ncols": 80, "nrows": 24}
        bar._state = self._tqdm(total=bar.total or None, desc=bar.stage, unit=bar.unit, file=self.stream,
                                leave=True, **sized)

    def update(self, bar: Bar) -> None:
        shown = bar._state
        if bar.detail:
            shown.set_postfix_str(bar.detail, refresh=False)  # drawn by the update below, with the count
        shown.update(bar.done - shown.n)

    def close(self, bar: Bar) -> None:
        bar._state.close()

    def write(self, text: str) -> None:
        """A log line above the bars (tqdm redraws them below)."""
        self._tqdm.write(text, file=self.stream)


def _sized(stream: IO[str]) -> bool:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # not a real file (a StringIO in tests)
        return False
    return size.columns > 0 and size.lines > 0


_renderer: Renderer = PlainLines()


def use_renderer(renderer: Renderer) -> Renderer:
    """Install ``renderer`` for every bar opened from now on; returns the one it replaces."""
    global _renderer
    previous, _renderer = _renderer, renderer
    return previous


def current_renderer() -> Renderer:
    return _renderer


@contextmanager
def progress(stage: str, total: int, unit: str = "step") -> Iterator[Bar]:
    """A bar for one loop of ``total`` steps; closed (and its bar finished) however the loop ends."""
    renderer = _renderer
    bar = Bar(stage, total, unit, renderer)
    renderer.start(bar)
    try:
        yield bar
    finally:
        renderer.close(bar)
