"""Benchmarks of lingmao's training speed: `python -m lingmao.bench`.

    python -m lingmao.bench hardware=cpu model=tiny bench.synthetic=true   # benchmark mode
    python -m lingmao.bench suite=cpu hardware=cpu                         # the CPU suite, < 5 min on 2 cores
    python -m lingmao.bench suite=gpu                                      # the GPU suite, on a CUDA machine

Modules: options (suite= and bench.* keys, typed by OmegaConf), compose
(Hydra's Compose API), loop (the engine's training step, driven by the
bench), measure (benchmark mode: timed steps, MFU, memory), stats (paired
blocks, medians and scipy's intervals), suite (what every suite shares),
cpu (the CPU suite), overhead (its engine-overhead part), bare (that part's
reference loop), startup (launch timing), gpu (the GPU suite), speedrun
(time to quality). Results go to MLflow, experiment `lingmao-bench`; a suite
also writes results.json and scaling.png to its output folder.
"""
