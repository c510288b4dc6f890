"""Bounded exponential backoff. Upstream retries forever; ours gives up after `max_attempts` attempts."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_ATTEMPTS = 8


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.1  # seconds before the first retry
    maximum: float = 5.0
    factor: float = 1.5
    jitter: float = 0.2  # ± fraction of the delay, so that many failing runs don't retry in lockstep

    def delay(self, retry: int) -> float:
        """Delay before retry number `retry` (1 = first retry)."""
        base = min(self.maximum, self.initial * self.factor ** max(0, retry - 1))
        if self.jitter:
            import random  # lazily: `import img.fsm` stays cheap

            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, base)

    def to_dict(self) -> dict[str, float]:
        return {
            "initial": self.initial,
            "maximum": self.maximum,
            "factor": self.factor,
            "jitter": self.jitter,
        }

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> Backoff:
        return cls(**{k: float(v) for k, v in d.items() if k in ("initial", "maximum", "factor", "jitter")})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # attempts per step, the first included
    backoff: Backoff = Backoff()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
