"""When a coordinator stops waiting for the rest of a round: a deadline that adapts.

A fixed timeout is either too short for a slow site or wastes everyone's time when a site is
gone. Instead, each round's deadline (counted from its first payload) is `slack` times the
latest arrival seen over recent rounds, kept within [floor, ceiling]. Late payloads count as
arrivals too, so a site that is consistently slow raises the deadline until it fits in again.
"""

from __future__ import annotations

from collections import deque


class AdaptiveDeadline:
    def __init__(self, floor_s: float, ceiling_s: float, slack: float, window: int = 8):
        if not 0 < floor_s <= ceiling_s:
            raise ValueError(f"need 0 < floor_s <= ceiling_s, got {floor_s}, {ceiling_s}")
        self.floor_s = floor_s
        self.ceiling_s = ceiling_s
        self.slack = slack
        self._latest_per_round: deque[float] = deque(maxlen=window)

    def observe_round(self, arrival_offsets_s: list[float]) -> None:
        """Record one round's arrivals, in seconds after its first payload (late ones too)."""
        if arrival_offsets_s:
            self._latest_per_round.append(max(arrival_offsets_s))

    def observe_late(self, offset_s: float) -> None:
        """A payload that came after its round closed, `offset_s` after that round's first."""
        if self._latest_per_round:
            self._latest_per_round[-1] = max(self._latest_per_round[-1], offset_s)
        else:
            self._latest_per_round.append(offset_s)

    def seconds(self) -> float:
        """The current deadline, in seconds after a round's first payload."""
        if not self._latest_per_round:
            return self.floor_s
        wanted = self.slack * max(self._latest_per_round)
        return min(self.ceiling_s, max(self.floor_s, wanted))
