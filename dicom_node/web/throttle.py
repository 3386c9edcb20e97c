"""Throttling of failed sign-ins (the sign-in form and /metrics' HTTP Basic authentication alike),
per account name and per client address: ``web.signin_free_attempts`` failures are free; each
further one makes the next attempt wait, ``web.signin_wait_s`` doubled per failure up to
``web.signin_wait_max_s``. While a wait lasts every attempt of that name or address is answered
429 with Retry-After, without its password being checked (no hashing cost, nothing learnt). A
wait always ends: the right password works once it is over, and signing in clears the name's
failures. A name's or address's failures are forgotten after a quiet spell of four maximum waits.

Kept in memory (a restart forgets them) and bounded: the oldest entries go first past ``MAX_KEYS``."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["MAX_KEYS", "Over", "SignInThrottle", "retry_after"]

MAX_KEYS = 20000


class Over(StrEnum):
    """What a failed sign-in is counted against."""

    ACCOUNT = "account"
    ADDRESS = "address"


@dataclass
class _Streak:
    failures: int = 0
    last: float = 0.0  # when the last failure was counted
    until: float = 0.0  # no attempt before this


class SignInThrottle:
    """Failed sign-ins counted per account name and per address; ``wait()`` says how long an attempt must wait."""

    def __init__(self, free_attempts: int, first_wait_s: float, max_wait_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.free, self.first, self.max = free_attempts, first_wait_s, max(max_wait_s, first_wait_s)
        self.forget_after = 4 * self.max
        self._clock = clock
        self._lock = threading.Lock()
        self._streaks: OrderedDict[tuple[Over, str], _Streak] = OrderedDict()

    @staticmethod
    def _keys(name: str, address: str | None) -> list[tuple[Over, str]]:
        return [(Over.ACCOUNT, name[:64]), (Over.ADDRESS, address or "-")]

    def _streak(self, key: tuple[Over, str], now: float) -> _Streak | None:
        streak = self._streaks.get(key)
        if streak is not None and now - streak.last > self.forget_after and now >= streak.until:
            del self._streaks[key]
            return None
        return streak

    def wait(self, name: str, address: str | None) -> tuple[float, Over | None]:
        """Seconds an attempt for ``name`` from ``address`` must still wait (0: it may go on), and why."""
        now = self._clock()
        with self._lock:
            longest, why = 0.0, None
            for key in self._keys(name, address):
                streak = self._streak(key, now)
                if streak is not None and streak.until - now > longest:
                    longest, why = streak.until - now, key[0]
            return longest, why

    def failed(self, name: str, address: str | None) -> float:
        """Count a failed attempt; the wait it imposes on the next one (0 within the free attempts)."""
        now = self._clock()
        with self._lock:
            longest = 0.0
            for key in self._keys(name, address):
                streak = self._streak(key, now) or _Streak()
                streak.failures += 1
                streak.last = now
                over = streak.failures - self.free
                if over >= 0:
                    wait = self.max if over > 60 else min(self.max, self.first * 2.0 ** over)
                    streak.until = now + wait
                    longest = max(longest, wait)
                self._streaks[key] = streak
                self._streaks.move_to_end(key)
            while len(self._streaks) > MAX_KEYS:
                self._streaks.popitem(last=False)
            return longest

    def succeeded(self, name: str) -> None:
        """A right password (once no wait stood in its way): the account's failures are cleared."""
        with self._lock:
            self._streaks.pop((Over.ACCOUNT, name[:64]), None)


def retry_after(seconds: float) -> str:
    """A Retry-After header's value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
