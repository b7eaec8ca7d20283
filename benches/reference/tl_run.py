"""What the TransformerLens reference scripts share: the command line and the model (the
bundled world model's Hugging Face folder booted with TransformerBridge), the timing (one
warm-up, then the best of several runs) and the versions they print beside their figures."""

import argparse
import importlib.metadata
import time

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerFast


def boot():
    """Parses --model and --repeats; returns (the booted model, its tokenizer, repeats)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="assets/world")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{args.model}/tokenizer.json")
    model = TransformerBridge.boot_transformers(args.model, tokenizer=tok, device="cpu")
    return model, tok, args.repeats


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
