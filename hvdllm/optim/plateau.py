"""The best validation loss so far and how long ago it was: what both early stopping and the
plateau lr reduction watch."""

from __future__ import annotations

import math


class BestTracker:
    """Lowest value observed and the number of observations since it last improved."""

    def __init__(self) -> None:
        self.best = math.inf
        self.since_best = 0

    def observe(self, value: float) -> bool:
        """Feed one value; returns whether it is a new best."""
        if value < self.best:
            self.best, self.since_best = value, 0
            return True
        self.since_best += 1
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.since_best = float(state["best"]), int(state["since_best"])
