"""How much faster the vectorised AP is than scikit-learn called once per class.

Run ``python benchmarks/eval_speed.py``; the default matrix (5,000 x 80) is COCO-LT's test set.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score

from ltdist.eval.metrics import average_precision


def map_speed(n: int = 5000, c: int = 80, repeats: int = 10, seed: int = 0) -> dict[str, float]:
    """Best-of-``repeats`` seconds of both implementations on long-tailed, tied float32 scores.

    The two are timed alternately, so a burst of load on a shared machine hits both alike.
    """
    rng = np.random.default_rng(seed)
    prevalence = np.geomspace(0.3, 0.002, c)  # long-tailed: a few frequent, many rare classes
    targets = (rng.random((n, c)) < prevalence).astype(np.int64)
    targets[rng.integers(n, size=c), np.arange(c)] = 1  # every class has a positive
    # float32 as a model emits them; 3 decimals make ties, as sigmoid outputs saturate.
    scores = np.round(rng.random((n, c)) + 0.5 * targets, 3).astype(np.float32)

    def loop() -> np.ndarray:
        return np.array([average_precision_score(targets[:, j], scores[:, j]) for j in range(c)])

    t_vec = t_loop = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        ap_vec = average_precision(scores, targets)
        t_vec = min(t_vec, time.perf_counter() - start)
        start = time.perf_counter()
        ap_loop = loop()
        t_loop = min(t_loop, time.perf_counter() - start)
    return {
        "n": n,
        "c": c,
        "vectorised_s": t_vec,
        "sklearn_loop_s": t_loop,
        "speedup": t_loop / t_vec,
        "max_abs_diff": float(np.max(np.abs(ap_vec - ap_loop))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--c", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    r = map_speed(args.n, args.c, args.repeats)
    print(f"AP on a {r['n']} x {r['c']} matrix (best of {args.repeats})")
    print(f"{'vectorised':<22} {1000 * r['vectorised_s']:>9.2f} ms")
    print(f"{'sklearn, per class':<22} {1000 * r['sklearn_loop_s']:>9.2f} ms")
    print(f"{'speed-up':<22} {r['speedup']:>9.1f} x")
    print(f"{'max |difference|':<22} {r['max_abs_diff']:>12.2e}")


if __name__ == "__main__":
    main()
