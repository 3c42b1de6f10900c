"""A named background thread that runs one check every interval until stopped (the node's sweepers)."""

from __future__ import annotations

import logging
import threading


class PeriodicThread:
    """Subclasses implement :meth:`tick`; an exception in one tick is logged and the next tick runs as usual."""

    name = "periodic"
    interval_s = 1.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> object:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                logging.getLogger(f"omnict.{self.name}").exception(f"{self.name}.tick.error")
            self._stop.wait(self.interval_s)
