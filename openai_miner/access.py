"""Who may query this miner, and who goes first: the blacklist and priority decisions.

Secure by default: a hotkey must be registered on the subnet and hold a validator permit, unless
the operator relaxes that; whitelisted hotkeys are always allowed. Pure functions over a
:class:`~openai_miner.chain.Registry` snapshot, so they cost microseconds per request.
"""

import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Callable

from openai_miner.chain import Registry


@dataclass(frozen=True)
class AccessPolicy:
    allow_non_registered: bool = False
    force_validator_permit: bool = True
    min_stake: float = 0.0
    whitelist: frozenset[str] = frozenset()


def blacklist(hotkey: str | None, registry: Registry, policy: AccessPolicy) -> tuple[bool, str]:
    """``(True, reason)`` to refuse the request before any model work, ``(False, reason)`` to serve it."""
    if not hotkey:
        return True, "request carries no hotkey"
    if hotkey in policy.whitelist:
        return False, "whitelisted hotkey"
    neuron = registry.get(hotkey)
    if neuron is None:
        if policy.allow_non_registered:
            return False, "unregistered hotkey allowed by --blacklist.allow_non_registered"
        return True, f"hotkey {hotkey} is not registered on this subnet"
    if policy.force_validator_permit and not neuron.validator_permit:
        return True, f"hotkey {hotkey} has no validator permit"
    if neuron.stake < policy.min_stake:
        return True, f"hotkey {hotkey} stake {neuron.stake:g} is below {policy.min_stake:g}"
    return False, "registered hotkey"


def priority(hotkey: str | None, registry: Registry) -> float:
    """Higher stake is served first when the axon is busy; unknown hotkeys last."""
    neuron = registry.get(hotkey)
    return neuron.stake if neuron else 0.0


class RateLimiter:
    """At most ``per_minute`` requests per hotkey in any 60 s window (0 turns it off).

    Checked only after the axon has verified the request's signature: the blacklist sees an
    unverified hotkey, and limiting there would let anyone spend a real validator's allowance.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._seen: defaultdict[str, deque[float]] = defaultdict(deque)

    def allow(self, hotkey: str) -> bool:
        if self.per_minute <= 0:
            return True
        now = self._clock()
        recent = self._seen[hotkey]
        while recent and recent[0] <= now - 60.0:
            recent.popleft()
        if len(recent) >= self.per_minute:
            return False
        recent.append(now)
        return True
