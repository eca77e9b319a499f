"""The test kit: everything to run a miner and its validators on one machine, with no network.

Like ``httpx.MockTransport`` or ``aiohttp.test_utils``, it is public and explicit, and shared by
the demo, the tests and the benchmark; ``from openai_miner.testing import ...`` gives every name
below (README, "The test kit"):

- :mod:`~openai_miner.testing.upstream`: a loopback OpenAI-compatible server with fault injection;
- :mod:`~openai_miner.testing.fake_source`: a scripted in-process token source;
- :mod:`~openai_miner.testing.localnet`: free ports, throwaway wallets, the mock chain, the
  offline public-IP answer, and the miner's command line;
- :mod:`~openai_miner.testing.process`: the real ``openai-miner`` command in a child process;
- :mod:`~openai_miner.testing.validator`: validator clients, a real ``bt.Dendrite``
  (:func:`~openai_miner.testing.validator.ask`) and signed HTTP with SSE parsing
  (:func:`~openai_miner.testing.validator.ask_http`), each returning an answer record;
- :mod:`~openai_miner.testing.loosh`: the SN78 (Loosh) validator's client.

The names load on first use (PEP 562): most modules here import bittensor, seconds on a small
machine, and a test that needs only the upstream should not pay for it. Nothing that serves
validators imports the kit.
"""

from typing import TYPE_CHECKING

from openai_miner.lazy import exports

if TYPE_CHECKING:
    from openai_miner.testing.fake_source import FakeSource, fake_token
    from openai_miner.testing.localnet import (
        NETUID,
        OPEN_TO_ALL,
        axon_info,
        free_port,
        make_wallet,
        miner_argv,
        mock_chain,
        offline_ip,
        register_validator,
    )
    from openai_miner.testing.loosh import LooshReply, LooshValidator
    from openai_miner.testing.process import MinerFailed, MinerProcess, miner_command, miner_env
    from openai_miner.testing.upstream import Fault, LoopbackUpstream, RecordedRequest, ToolCall
    from openai_miner.testing.validator import (
        Answer,
        ask,
        ask_http,
        openai_client,
        post_signed,
        signing_client,
        sse_event,
        sse_events,
    )

_MODULES = {
    "upstream": ("LoopbackUpstream", "Fault", "ToolCall", "RecordedRequest"),
    "fake_source": ("FakeSource", "fake_token"),
    "localnet": (
        "NETUID", "OPEN_TO_ALL", "free_port", "offline_ip", "make_wallet", "mock_chain", "register_validator",
        "miner_argv", "axon_info",
    ),
    "process": ("MinerProcess", "MinerFailed", "miner_command", "miner_env"),
    "validator": (
        "Answer", "ask", "ask_http", "signing_client", "openai_client", "post_signed", "sse_event", "sse_events",
    ),
    "loosh": ("LooshValidator", "LooshReply"),
}
_HOMES = {name: f"openai_miner.testing.{module}" for module, names in _MODULES.items() for name in names}

__all__ = [  # written out, for type checkers and editors; tests/test_kit.py holds it equal to _HOMES
    "LoopbackUpstream", "Fault", "ToolCall", "RecordedRequest",
    "FakeSource", "fake_token",
    "NETUID", "OPEN_TO_ALL", "free_port", "offline_ip", "make_wallet", "mock_chain", "register_validator",
    "miner_argv", "axon_info",
    "MinerProcess", "MinerFailed", "miner_command", "miner_env",
    "Answer", "ask", "ask_http", "signing_client", "openai_client", "post_signed", "sse_event", "sse_events",
    "LooshValidator", "LooshReply",
]


__getattr__, __dir__ = exports(__name__, _HOMES)
