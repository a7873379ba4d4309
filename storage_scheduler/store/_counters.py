"""What a store has done, as plain numbers that :mod:`storage_scheduler.metrics` exports.

Kept apart from the store so that the exporter reads counters without depending on how
the store does its work. They are updated without locks: they feed dashboards, and a
lock would be paid on every store operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LATENCY_BUCKETS", "LatencyHistogram", "StoreCounters"]

#: Upper bounds (seconds) of the latency histogram buckets.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, float("inf"))


@dataclass
class LatencyHistogram:
    """Durations of store operations, in the buckets of :data:`LATENCY_BUCKETS`."""

    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                return


@dataclass
class StoreCounters:
    """What one :class:`Store` instance has done since it was opened."""

    objects_written: int = 0
    bytes_written: int = 0
    objects_read: int = 0
    bytes_read: int = 0
    #: Objects refused because they were not signed with the signing key.
    objects_untrusted: int = 0
    #: Writes (serialization included) and reads (deserialization included) under way.
    writes_in_flight: int = 0
    reads_in_flight: int = 0
    write_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)
    read_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)
