"""Benchmarks of lingmao's training speed: `python -m lingmao.bench`.

    python -m lingmao.bench hardware=cpu model=tiny bench.synthetic=true   # benchmark mode
    python -m lingmao.bench suite=cpu hardware=cpu                         # the CPU suite, < 5 min on 2 cores
    python -m lingmao.bench suite=gpu                                      # the GPU suite, on a CUDA machine

Modules: options (suite= and bench.* keys), compose (Hydra's Compose API),
bare (the reference loop), measure (benchmark mode: timed steps, MFU, memory),
stats (paired blocks, medians and intervals), startup (launch timing), suites
(running a suite; the CPU suite's parts), gpu (the GPU suite). Results go to
MLflow, experiment `lingmao-bench`; a suite also writes results.json and
scaling.png to its output folder.
"""
