"""What the TransformerLens reference scripts share: the timing (one warm-up, then the best
of several runs) and the versions they print beside their figures."""

import importlib.metadata
import time

import torch


def best_of(run, repeats):
    """Calls run() once to warm up, then `repeats` times; returns (fastest seconds, last result)."""
    run()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def versions():
    """The library versions and torch's thread count, for the JSON a script prints."""
    return {
        "transformer_lens": importlib.metadata.version("transformer_lens"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
