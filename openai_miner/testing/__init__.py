"""The test kit: everything to run a miner and its validators on one machine, with no network.

Like ``httpx.MockTransport`` or ``aiohttp.test_utils``, it is public and explicit, and shared by
the demo, the tests and the benchmark:

- :mod:`~openai_miner.testing.upstream`: a loopback OpenAI-compatible server with fault injection;
- :mod:`~openai_miner.testing.fake_source`: a scripted in-process token source;
- :mod:`~openai_miner.testing.localnet`: free ports, throwaway wallets, the mock chain, the
  offline public-IP answer, and the miner's command line;
- :mod:`~openai_miner.testing.validator`: one validator client (a real ``bt.Dendrite``) whose
  :func:`~openai_miner.testing.validator.ask` returns an answer record.

Nothing that serves validators imports it.
"""
