"""selfmod against black-box search (grid, random, Optuna TPE) and other self-tuning methods
(SGD-HD, Adam-HD, a hyperoptimizer stack) on MNIST-1D, with and without safeguards.

    python benchmarks/vs_search.py                  # the published MLP table: 5 seeds (~30 min)
    python benchmarks/vs_search.py --set model=cnn  # the 1-D CNN table (~75 min; jobs=2 halves it)
    python benchmarks/vs_search.py --set seeds=[0] --set steps=500

Same as ``selfmod bench vs-search``; writes benchmarks/results/vs_search.{md,json,png}
(``vs_search_cnn.*`` for the CNN).
"""

import sys

from selfmod.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "bench", "vs-search", *sys.argv[1:]]
    main()
