"""Progress lines for long work: done/total, rate and ETA, printed at most every few seconds."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total_items: int, unit: str = "docs", every_seconds: float = 5.0, stream=None):
        self.label, self.total_items, self.unit = label, total_items, unit
        self.every_seconds = every_seconds
        self.stream = stream or sys.stdout
        self.items = self.tokens = 0
        self.started = self.last_print = time.monotonic()

    def update(self, items: int, tokens: int = 0):
        self.items += items
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last_print >= self.every_seconds or self.items >= self.total_items:
            self.last_print = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.items / elapsed
        eta = (self.total_items - self.items) / rate if rate > 0 else float("inf")
        # a token rate only where tokens are counted (tail-patch counts pairs): never a false "0 tok/s"
        tokens = f"{self.tokens / elapsed:,.0f} tok/s " if self.tokens else ""
        return (
            f"[{self.label}] {self.items:,}/{self.total_items:,} {self.unit} "
            f"{tokens}{rate:,.1f} {self.unit}/s ETA {eta:,.0f}s"
        )
