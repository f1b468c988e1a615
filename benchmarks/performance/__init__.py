"""medfed's performance benchmark: one command that writes JSON, markdown tables and a plot.

    python -m benchmarks.performance [--quick] [--parts overhead,engines,scale[,deployment]] [--out DIR]

Parts (one module each):

* ``overhead`` (:mod:`~benchmarks.performance.overhead`): for each task's default model, medfed's in-process
  engine against a plain PyTorch loop doing the same local steps, evaluations and FedAvg on the same task
  objects (:mod:`~benchmarks.performance.baseline`); seconds per round and the overhead.
* ``engines`` (:mod:`~benchmarks.performance.engines`): the quickstart and ct-iid on every engine with 1 and 2
  workers, and on Flower's own Simulation Engine with a minimal ClientApp
  (:mod:`~benchmarks.performance.flower_peer`): start-up, per-round time split into train / evaluate / central /
  bookkeeping, parallel efficiency.
* ``scale`` (:mod:`~benchmarks.performance.scale`): the tabular task with 10 to 10,000 sites, 10 sampled per
  round: discovery, seconds per round, peak memory.
* ``deployment`` (:mod:`~benchmarks.performance.deployment`, off by default): a SuperLink and two SuperNodes on
  loopback: per-round latency and where it goes.

A part that fails records its one-line reason and the others go on. Run directories live in temporary folders.
"""
