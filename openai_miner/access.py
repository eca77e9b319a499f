"""Who may query this miner, who goes first, and how often: one :class:`Access` every front shares.

Secure by default: a hotkey must be registered on the subnet and hold a validator permit, unless
the operator relaxes that; whitelisted hotkeys are always allowed. The decisions read a
:class:`~openai_miner.chain.Registry` snapshot, so they cost microseconds per request. Checks come
in two steps because signatures are expensive: :meth:`Access.refusal` needs only the claimed
hotkey and runs before any signature work; :meth:`Access.admit` (rate limit, repeated prompts)
runs after the signature proved the hotkey, so nobody can spend a real validator's allowance.
"""

import argparse
import hashlib
import re
import time
from collections import Counter, OrderedDict, defaultdict, deque
from dataclasses import dataclass
from typing import Callable, Sequence

import bittensor as bt

from openai_miner.chain import Registry
from openai_miner.config import add_bool, at_least


def add_args(parser: argparse.ArgumentParser) -> None:
    add_bool(
        parser, "--blacklist.allow_non_registered", default=False,
        help="Serve hotkeys that are not registered on the subnet.",
    )
    add_bool(
        parser, "--blacklist.force_validator_permit", default=True,
        help="Refuse registered hotkeys without a validator permit.",
    )
    parser.add_argument(
        "--blacklist.whitelist", type=str, nargs="*", default=[], metavar="HOTKEY",
        help="Hotkeys always served.",
    )
    parser.add_argument(
        "--blacklist.min_stake", type=at_least(0, float), default=0.0,
        help="Refuse hotkeys with less stake than this (TAO).",
    )
    parser.add_argument(
        "--blacklist.max_requests_per_minute", type=at_least(0), default=600,
        help="Requests one hotkey may make per minute before getting HTTP 429 (0 = no limit; "
        "whitelisted hotkeys are not limited).",
    )
    parser.add_argument(
        "--blacklist.max_refusals_per_second", type=at_least(0, float), default=20.0,
        help="A source address refused more often than this is cut off for 10 s: its connections are "
        "closed unread (0 = never).",
    )
    parser.add_argument(
        "--neuron.prompt_cache_seconds", type=at_least(0, float), default=0.0,
        help="Refuse a conversation repeated within this many seconds (0 = off).",
    )


@dataclass(frozen=True)
class AccessPolicy:
    allow_non_registered: bool = False
    force_validator_permit: bool = True
    min_stake: float = 0.0
    whitelist: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: bt.Config) -> "AccessPolicy":
        return cls(
            allow_non_registered=config.blacklist.allow_non_registered,
            force_validator_permit=config.blacklist.force_validator_permit,
            min_stake=config.blacklist.min_stake,
            whitelist=frozenset(config.blacklist.whitelist or ()),
        )


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
    """At most ``per_minute`` requests per hotkey in any 60 s window (0 turns it off)."""

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


class RecentPrompts:
    """Refuses the same conversation twice within ``window`` seconds (off when ``window`` is 0)."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    @staticmethod
    def key(messages: Sequence[str]) -> str:
        digest = hashlib.sha256()
        for message in messages:
            digest.update(message.encode("utf-8", errors="surrogatepass"))
            digest.update(b"\x00")
        return digest.hexdigest()

    def check_and_remember(self, messages: Sequence[str]) -> bool:
        """True if this conversation is new within the window (and remember it), else False."""
        if self.window <= 0:
            return True
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) <= now - self.window:
            self._seen.popitem(last=False)
        key = self.key(messages)
        if key in self._seen:
            return False
        self._seen[key] = now
        return True


@dataclass(frozen=True)
class Refusal:
    """A request turned away before any model work: the HTTP status and a reason for the caller."""

    status: int
    reason: str


class Offenders:
    """Source addresses refused more than ``per_second`` times a second, sustained (a burst of
    twice that passes), cut off for ``cooldown`` seconds: the fronts close their connections unread.

    A refusal still costs the miner a parsed request and a response, about 0.3 ms on the event
    loop every validator shares; a flood of them at thousands a second starves the validators. A
    connection closed before it is read costs a fraction of that. Keyed by address, not hotkey:
    a claimed hotkey costs an attacker nothing to change. Used from the serving loop's thread only.
    """

    def __init__(
        self, per_second: float, cooldown: float = 10.0, clock: Callable[[], float] = time.monotonic, capacity: int = 100_000
    ) -> None:
        self.per_second = per_second
        self.cooldown = cooldown
        self._clock = clock
        self._capacity = capacity
        self._allowance: dict[str, tuple[float, float]] = {}  # address -> (refusals left, when), oldest first
        self._until: dict[str, float] = {}  # address -> end of its cut-off

    def refused(self, address: str | None) -> None:
        """Count a refusal of a request from ``address``; past the rate, cut the address off."""
        if self.per_second <= 0 or not address:
            return
        now, burst = self._clock(), 2 * self.per_second
        left, then = self._allowance.pop(address, (burst, now))
        left = min(burst, left + (now - then) * self.per_second) - 1
        if left >= 0:
            self._allowance[address] = (left, now)
            while len(self._allowance) > self._capacity:
                del self._allowance[next(iter(self._allowance))]
            return
        self._until[address] = now + self.cooldown
        bt.logging.warning(
            f"cut off {address} for {self.cooldown:g}s: refused more than {self.per_second:g} times a second"
        )

    def cut_off(self, address: str | None) -> bool:
        """Whether connections from ``address`` are to be closed unread now."""
        if not self._until or address is None:
            return False
        until = self._until.get(address)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._until[address]
        return False


SPECIFIC = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,}|\d+(?:\.\d+)?")
"""What varies between two refusals of one kind: a hotkey (ss58), a number."""
MAX_KINDS = 64
"""Kinds of refusal counted apart in :attr:`Refusals.totals`; past that, ``"other"``."""


def reason_kind(reason: str) -> str:
    """The kind of a refusal: its reason up to the detail after a colon, hotkeys and numbers as
    ``*``. A bounded label, whatever callers send (``"hotkey * has no validator permit"``)."""
    return SPECIFIC.sub("*", reason.split(":", 1)[0])


class Refusals:
    """Refusals counted, and logged as one summary line per ``every`` seconds instead of one each:
    a stranger's flood must not write gigabytes of log. ``totals``: every refusal since the start,
    by kind (:func:`reason_kind`), for the metrics."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._since = clock()
        self._reasons: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()

    def count(self, reason: str) -> None:
        self._reasons[reason] += 1
        kind = reason_kind(reason)
        self.totals[kind if kind in self.totals or len(self.totals) < MAX_KINDS else "other"] += 1
        now = self._clock()
        if now - self._since >= self.every:
            total, (example, _) = sum(self._reasons.values()), self._reasons.most_common(1)[0]
            bt.logging.info(f"refused {total} requests in {now - self._since:.0f}s, most: {example}")
            self._reasons.clear()
            self._since = now


class Access:
    """The policy, the registry snapshot it reads, and the per-hotkey limits, for every front."""

    def __init__(
        self,
        policy: AccessPolicy,
        registry: Registry,
        limiter: RateLimiter,
        recent: RecentPrompts,
        offenders: Offenders | None = None,
        refusals: Refusals | None = None,
    ) -> None:
        self.policy = policy
        self.registry = registry
        self.limiter = limiter
        self.recent = recent
        self.offenders = offenders or Offenders(0)
        self.refusals = refusals or Refusals()

    @classmethod
    def from_config(cls, config: bt.Config, registry: Registry) -> "Access":
        return cls(
            AccessPolicy.from_config(config),
            registry,
            RateLimiter(config.blacklist.max_requests_per_minute),
            RecentPrompts(config.neuron.prompt_cache_seconds),
            Offenders(config.blacklist.max_refusals_per_second),
        )

    def refused(self, address: str | None, reason: str) -> None:
        """A request from ``address`` was turned away for ``reason``: counted in the periodic
        summary, and against the address (past the rate, it is cut off)."""
        self.refusals.count(reason)
        self.offenders.refused(address)

    def refusal(self, hotkey: str | None) -> Refusal | None:
        """Whether this (claimed) hotkey may ask at all: 403 with the reason, or ``None``."""
        refused, reason = blacklist(hotkey, self.registry, self.policy)
        return Refusal(403, reason) if refused else None

    def priority(self, hotkey: str | None) -> float:
        return priority(hotkey, self.registry)

    def admit(self, hotkey: str | None, conversation: Sequence[str]) -> Refusal | None:
        """After the signature: the hotkey's rate limit, then a recently repeated conversation (429)."""
        if hotkey not in self.policy.whitelist and not self.limiter.allow(hotkey or ""):
            return Refusal(429, f"more than {self.limiter.per_minute} requests in a minute from this hotkey")
        if not self.recent.check_and_remember(conversation):
            return Refusal(429, f"the same conversation was asked within {self.recent.window:g}s")
        return None
