#!/usr/bin/env python3
"""PyTorch reference SAE trainer for the Rust training speed/quality comparison (float32; CPU,
or a CUDA GPU with --device cuda).

Usage: sae_torch.py --data FILE --variant {topk_dense,topk_sparse,relu_l1} --steps N
                    [--warmup 3] [--lr 4e-4] [--k 32] [--d-sae 8192] [--batch 4096] [--l1 L] [--seed 0]
                    [--device cpu|cuda]
Prints ONE JSON line: variant, steps, batch, tokens_per_second, fvu, l0, final_loss, torch, threads.

Recipe (the Rust side implements exactly this):
- Data: safetensors `train` [65536, 512], `eval` [8192, 512] (benches/reference/sae_synthetic.py).
- Parameters (float32): W_enc [512, d_sae], b_enc [d_sae], W_dec [d_sae, 512], b_dec [512].
- Init (torch.manual_seed(seed)): W_dec = randn(d_sae, 512), rows normalised to unit L2 norm;
  W_enc = W_dec.T (a copy); b_enc = 0; b_dec = mean of the first training batch (rows 0..batch).
- Batches: step s (0-based) uses rows [(s*batch) mod 65536, +batch) of `train`, in order, cycling.
- Forward: pre = (x - b_dec) @ W_enc + b_enc.
  - topk_*: top_vals, top_idx = pre.topk(k, dim=-1); acts = relu(top_vals).
    topk_dense: scatter acts into a dense [batch, d_sae] zero tensor, x_hat = dense @ W_dec + b_dec.
    topk_sparse: x_hat = F.embedding_bag(top_idx, W_dec, per_sample_weights=acts, mode="sum") + b_dec.
  - relu_l1: acts = relu(pre); x_hat = acts @ W_dec + b_dec.
- Loss: mse = ((x_hat - x)^2).sum(-1).mean().
  topk: loss = mse.  relu_l1: loss = mse + l1 * (acts * W_dec.norm(dim=1)).sum(-1).mean().
- Optimiser: torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8), no weight decay, no clipping,
  constant lr, no warm-up.
- topk only: before optimizer.step(), remove from W_dec.grad its component parallel to each W_dec
  row (grad -= (grad.w)/(w.w) * w, row-wise); after the step renormalise W_dec rows to unit norm
  (under no_grad). relu_l1: no decoder constraint.
- Eval after training, no grad, on all of `eval` in chunks of 4096:
  FVU = sum ||x - x_hat||^2 / sum ||x - x_bar||^2 (pooled; x_bar = eval-set mean vector);
  L0 = mean number of nonzero acts per token.
- Timing: time.perf_counter over steps warmup..steps-1 (the first `warmup` steps are untimed;
  on CUDA the device is synchronised before each clock reading);
  tokens_per_second = (steps - warmup) * batch / elapsed. final_loss = loss of the last step.
- Default l1 = 20.0. On the synthetic data (200 steps, lr 4e-4) relu_l1 reaches eval L0 ~114,
  FVU ~0.93. L0 is limited by the lr, not by l1: on the training batch at step 200, l1 = 5 / 20 / 100
  gave L0 ~169 / 113 / 100, so 30-80 is out of reach in 200 steps; 20 is the compromise.
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def encode(p, x, variant, k):
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if variant == "relu_l1":
        acts = torch.relu(pre)
        return acts, None, acts @ p["W_dec"] + p["b_dec"]
    top_vals, top_idx = pre.topk(k, dim=-1)
    acts = torch.relu(top_vals)
    if variant == "topk_dense":
        dense = torch.zeros_like(pre).scatter(-1, top_idx, acts)
        x_hat = dense @ p["W_dec"] + p["b_dec"]
    else:
        x_hat = F.embedding_bag(top_idx, p["W_dec"], per_sample_weights=acts, mode="sum") + p["b_dec"]
    return acts, top_idx, x_hat


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--variant", required=True, choices=["topk_dense", "topk_sparse", "relu_l1"])
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--d-sae", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--l1", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    data = load_file(args.data)
    train, evalx = data["train"].float().contiguous(), data["eval"].float().contiguous()
    n_train, d_model = train.shape
    assert n_train % args.batch == 0, "batch must divide the number of training rows"

    w_dec = torch.randn(args.d_sae, d_model)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    p = {
        "W_enc": w_dec.t().clone().contiguous(),
        "b_enc": torch.zeros(args.d_sae),
        "W_dec": w_dec.clone(),
        "b_dec": train[: args.batch].mean(0).clone(),
    }
    p = {name: t.to(dev) for name, t in p.items()}
    train, evalx = train.to(dev), evalx.to(dev)
    for t in p.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(list(p.values()), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    topk = args.variant != "relu_l1"

    loss_val = float("nan")
    start = None
    for step in range(args.steps):
        if step == args.warmup:
            sync()
            start = time.perf_counter()
        lo = (step * args.batch) % n_train
        x = train[lo: lo + args.batch]
        acts, _, x_hat = encode(p, x, args.variant, args.k)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        if topk:
            loss = mse
        else:
            loss = mse + args.l1 * (acts * p["W_dec"].norm(dim=1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if topk:
            with torch.no_grad():
                w, g = p["W_dec"], p["W_dec"].grad
                g -= ((g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)) * w
        opt.step()
        if topk:
            with torch.no_grad():
                p["W_dec"] /= p["W_dec"].norm(dim=1, keepdim=True)
        loss_val = loss.item()
    sync()
    elapsed = time.perf_counter() - start
    tps = (args.steps - args.warmup) * args.batch / elapsed

    with torch.no_grad():
        x_bar = evalx.double().mean(0)
        sse = sst = nnz = 0.0
        for lo in range(0, evalx.shape[0], 4096):
            x = evalx[lo: lo + 4096]
            acts, _, x_hat = encode(p, x, args.variant, args.k)
            sse += (x_hat - x).double().pow(2).sum().item()
            sst += (x.double() - x_bar).pow(2).sum().item()
            nnz += (acts != 0).sum().item()
    print(json.dumps({
        "variant": args.variant, "steps": args.steps, "batch": args.batch,
        "tokens_per_second": tps, "fvu": sse / sst, "l0": nnz / evalx.shape[0],
        "final_loss": loss_val, "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(dev),
    }))


if __name__ == "__main__":
    main()
