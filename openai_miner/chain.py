"""What the miner needs from the chain: a subtensor (real or mock) and who is registered.

The blacklist and priority run on every request, so they read a :class:`Registry` snapshot that
the run loop refreshes, never the chain itself.
"""

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import bittensor as bt


@dataclass(frozen=True)
class Neuron:
    uid: int
    hotkey: str
    stake: float
    validator_permit: bool


@dataclass(frozen=True)
class Registry:
    """The subnet's neurons by hotkey, as of ``block``."""

    neurons: dict[str, Neuron] = field(default_factory=dict)
    block: int | None = None

    @classmethod
    def of(cls, neurons: Iterable[Neuron], block: int | None = None) -> "Registry":
        return cls({neuron.hotkey: neuron for neuron in neurons}, block)

    def get(self, hotkey: str | None) -> Neuron | None:
        return self.neurons.get(hotkey) if hotkey else None


class NeuronSource(Protocol):
    def neurons(self, netuid: int) -> list: ...


def fetch_registry(subtensor: NeuronSource, netuid: int) -> Registry:
    """Read the subnet's neurons (``neurons()``: MockSubtensor's ``metagraph()`` does not work)."""
    return Registry.of(
        (
            Neuron(
                uid=int(info.uid),
                hotkey=str(info.hotkey),
                stake=float(getattr(info.stake, "tao", info.stake)),
                validator_permit=bool(info.validator_permit),
            )
            for info in subtensor.neurons(netuid)
        ),
        block=getattr(subtensor, "block_number", None),
    )


def mock_subtensor(netuid: int) -> bt.MockSubtensor:
    """An in-process chain (``--mock``) with the subnet created; its state is process-global."""
    subtensor = bt.MockSubtensor()
    if netuid not in subtensor.chain_state["SubtensorModule"]["NetworksAdded"]:
        subtensor.create_subnet(netuid)
    return subtensor


def register_mock_neuron(
    subtensor: bt.MockSubtensor,
    netuid: int,
    hotkey: str,
    coldkey: str,
    *,
    stake: float = 0.0,
    validator_permit: bool = False,
) -> int:
    """Register ``hotkey`` on the mock chain (idempotent) and set its permit; returns its uid."""
    existing = fetch_registry(subtensor, netuid).get(hotkey)
    uid = existing.uid if existing else subtensor.force_register_neuron(netuid, hotkey, coldkey, stake=stake)
    permits = subtensor.chain_state["SubtensorModule"]["ValidatorPermit"][netuid][uid]
    permits[subtensor.block_number] = validator_permit
    return uid
