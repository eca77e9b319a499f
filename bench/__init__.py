"""Benchmark of the miner: latency it adds, concurrency, throughput and memory (``python -m bench``).

Everything runs on 127.0.0.1, in three kinds of process so that each one's CPU and memory can be
read apart from the others:

* the upstream (:mod:`bench.upstream`): the project's loopback OpenAI-compatible server, emitting
  ``N`` numbered words at a fixed interval and recording when it wrote each one;
* two miners (:mod:`bench.serve`): this project's ``OpenAIMiner`` and the SN1-pattern baseline
  (:mod:`bench.baseline`), each a real axon on the mock chain in its own process, both pointed at
  the same upstream;
* the validators, in the benchmark's own process (:mod:`bench.validators`): one real
  ``bt.Dendrite`` per concurrent stream.

:mod:`bench.measure` runs the workloads and turns the timestamps into figures, :mod:`bench.report`
and :mod:`bench.plot` write the table and the plot.
"""
