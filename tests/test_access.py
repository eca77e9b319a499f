import pytest

from openai_miner.access import AccessPolicy, blacklist, priority
from openai_miner.chain import Neuron, Registry
from openai_miner.access import RecentPrompts

REGISTRY = Registry.of(
    [
        Neuron(uid=0, hotkey="validator", stake=500.0, validator_permit=True),
        Neuron(uid=1, hotkey="miner", stake=1.0, validator_permit=False),
        Neuron(uid=2, hotkey="poor-validator", stake=2.0, validator_permit=True),
    ]
)


@pytest.mark.parametrize(
    "hotkey,policy,refused,reason",
    [
        ("validator", AccessPolicy(), False, "registered"),
        ("stranger", AccessPolicy(), True, "not registered"),
        ("stranger", AccessPolicy(allow_non_registered=True), False, "allowed"),
        ("miner", AccessPolicy(), True, "no validator permit"),
        ("miner", AccessPolicy(force_validator_permit=False), False, "registered"),
        ("stranger", AccessPolicy(whitelist=frozenset({"stranger"})), False, "whitelisted"),
        ("poor-validator", AccessPolicy(min_stake=10.0), True, "below 10"),
        (None, AccessPolicy(allow_non_registered=True), True, "no hotkey"),
    ],
)
def test_blacklist_decisions(hotkey, policy, refused, reason) -> None:
    decision = blacklist(hotkey, REGISTRY, policy)
    assert decision[0] is refused and reason in decision[1]


def test_priority_is_stake() -> None:
    assert priority("validator", REGISTRY) > priority("poor-validator", REGISTRY) > priority("stranger", REGISTRY)


def test_recent_prompts_refuses_repeat_within_window() -> None:
    now = [0.0]
    cache = RecentPrompts(10.0, clock=lambda: now[0])
    assert cache.check_and_remember(["a", "b"])
    assert not cache.check_and_remember(["a", "b"])
    assert cache.check_and_remember(["ab"])  # not the same conversation
    now[0] = 10.5
    assert cache.check_and_remember(["a", "b"])


def test_recent_prompts_off_by_default() -> None:
    cache = RecentPrompts(0.0)
    assert cache.check_and_remember(["x"]) and cache.check_and_remember(["x"])


def test_rate_limit_per_hotkey_sliding_minute() -> None:
    from openai_miner.access import RateLimiter

    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # one hotkey cannot spend another's allowance
    now[0] = 59.9
    assert not limiter.allow("a")
    now[0] = 60.1
    assert limiter.allow("a")


def test_rate_limit_off() -> None:
    from openai_miner.access import RateLimiter

    limiter = RateLimiter(0)
    assert all(limiter.allow("a") for _ in range(1000))


def test_arrivals_remember_when_a_request_came_and_age_out() -> None:
    from openai_miner.fronts.axon import Arrivals

    now = [100.0]
    arrivals = Arrivals(clock=lambda: now[0], keep=10.0)
    arrivals.note("hk", 1)
    now[0] = 100.05
    assert arrivals.pop("hk", 1) == 100.0  # the deadline counts from arrival, not from forward()
    assert arrivals.pop("hk", 1) == 100.05  # never noted (or already used): now
    arrivals.note("hk", 2)
    now[0] = 200.0
    arrivals.note("other", 3)  # noting prunes what is older than `keep`
    assert ("hk", 2) not in arrivals._seen


def test_an_address_refused_past_the_rate_is_cut_off_for_the_cooldown() -> None:
    from openai_miner.access import Offenders

    now = [0.0]
    offenders = Offenders(per_second=5, cooldown=10, clock=lambda: now[0])
    for _ in range(10):  # a burst of twice the rate passes
        offenders.refused("10.0.0.9")
    assert not offenders.cut_off("10.0.0.9")
    now[0] = 1.0  # five more in the next second: still within the rate
    for _ in range(5):
        offenders.refused("10.0.0.9")
    assert not offenders.cut_off("10.0.0.9")
    offenders.refused("10.0.0.9")  # one over
    assert offenders.cut_off("10.0.0.9") and not offenders.cut_off("10.0.0.1") and not offenders.cut_off(None)
    now[0] = 10.9
    assert offenders.cut_off("10.0.0.9")
    now[0] = 11.1
    assert not offenders.cut_off("10.0.0.9")  # forgiven after the cooldown
    offenders.refused("10.0.0.9")
    assert not offenders.cut_off("10.0.0.9")


def test_refusals_cut_off_nobody_when_turned_off_and_remember_a_bounded_number_of_addresses() -> None:
    from openai_miner.access import Offenders

    off = Offenders(per_second=0)
    for _ in range(1000):
        off.refused("10.0.0.9")
    assert not off.cut_off("10.0.0.9")
    few = Offenders(per_second=1, capacity=3)
    for index in range(10):
        few.refused(f"10.0.0.{index}")
    assert len(few._allowance) == 3
