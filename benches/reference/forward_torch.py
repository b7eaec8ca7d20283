#!/usr/bin/env python3
"""PyTorch reference for benches/forward.rs: GPT-2-small shape (12 layers, d_model 768,
random weights), batch 8 x 128, capturing blocks.6.mlp.hook_post (the input of c_proj) with
a forward pre-hook, CPU (or --device cuda), eager attention, inference mode. Prints tokens/s
as JSON."""

import argparse
import json
import statistics
import time

import torch
import transformers

BATCH, SEQ, WARMUP, ITERS = 8, 128, 2, 10


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    dev = torch.device(ap.parse_args().device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval().to(dev)
    captured = {}
    model.transformer.h[6].mlp.c_proj.register_forward_pre_hook(
        lambda _m, args: captured.__setitem__("blocks.6.mlp.hook_post", args[0])
    )
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ)).to(dev)
    times = []
    with torch.inference_mode():
        for i in range(WARMUP + ITERS):
            sync()
            start = time.perf_counter()
            model(ids, use_cache=False)
            sync()
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
    assert captured["blocks.6.mlp.hook_post"].shape == (BATCH, SEQ, 3072)
    mean = statistics.mean(times)
    print(json.dumps({
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "seconds_per_batch": mean,
        "tokens_per_second": BATCH * SEQ / mean,
    }))


if __name__ == "__main__":
    main()
