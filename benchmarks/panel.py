"""The development panel (the rule: :mod:`selfmod.bench.panel`): the loop's defaults against
AdamW at lr 1e-3, a 5-point AdamW sweep, Prodigy and Schedule-Free on six offline workloads,
development split 1, seeds 10-12.

    python benchmarks/panel.py --jobs 2 --tag before
    python benchmarks/panel.py --contenders fit --fit-set cycle=100 --tag cycle100 --jobs 2
"""

from selfmod.bench.panel import run_panel

if __name__ == "__main__":
    run_panel()
