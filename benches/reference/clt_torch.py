#!/usr/bin/env python3
"""PyTorch reference cross-layer transcoder (CLT) trainer for the side-by-side comparison with
`monoscope clt train`'s step (benches/compare_clt.sh), float32 on the CPU.

Usage: clt_torch.py --data FILE --variant {dense,sparse} --steps N [--warmup 3]

Recipe (the Rust side, src/sae/clt.rs, implements this; AuxK is off on both sides here):
- Data: safetensors `train` [rows, 2·L·d] and `eval` [rows, 2·L·d], each row every layer's
  `hook_resid_mid` then every layer's `hook_mlp_out` (benches/clt.rs writes them from the
  bundled world model); L layers, d wide, `features` and `k` from FILE.json beside it.
- Scales: per layer, inputs and targets multiplied by sqrt(d) / (mean L2 norm over the first
  batch); output biases b_dec[l] = mean scaled target of the first batch.
- Parameters per layer l: W_enc[l] [d, F], b_enc[l] [F], W_dec[l] [F, (L - l)·d]; init: decoder
  rows random directions of norm 0.1 / (1 + j) into layer l + j, W_enc[l] = the own-layer
  decoder rows transposed.
- Forward per layer: pre = x_l @ W_enc[l] + b_enc[l]; each row's 4k largest positive values are
  candidates; the batch's k·rows largest candidates fire (BatchTopK). Decode: dense (fired
  activations scattered into [rows, F] @ W_dec[l]) or sparse (embedding_bag over the candidates
  with the unfired weighted 0). Layer t's prediction: b_dec[t] + the writes of layers <= t.
- Loss: sum over layers of ||y_hat - y||^2, averaged over rows. Adam(lr, 0.9, 0.999, 1e-8);
  lr warms up linearly over 100 steps and falls linearly to 0 over the last 20% of steps.
- Batches: step s uses rows [(s·batch) mod rows, +batch) of `train`, in order, cycling.
- After training: each layer's JumpReLU threshold is the mean batch threshold (smallest fired
  value) over the next 8 batches; eval FVU per layer = sum ||y - y_hat||^2 / sum ||y - y_bar||^2
  with JumpReLU (pre > threshold) activations, on `eval`.
- Timing: the steps after `warmup`; tokens_per_second = (steps - warmup)·batch / elapsed.
Prints one JSON line.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from safetensors import safe_open


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--variant", choices=["dense", "sparse"], required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    with safe_open(args.data, "pt") as f:
        train, evaluation = f.get_tensor("train"), f.get_tensor("eval")
    with open(args.data + ".json") as f:
        meta = json.load(f)
    n, d = int(meta["layers"]), int(meta["width"])
    features, k = int(meta["features"]), int(meta["k"])
    cands = min(4 * k, features)
    rows, batch = train.shape[0], args.batch

    def split(x):
        return [x[:, l * d:(l + 1) * d] for l in range(n)], [x[:, (n + l) * d:(n + l + 1) * d] for l in range(n)]

    first_x, first_y = split(train[:batch])
    s_in = [d ** 0.5 / v.norm(dim=1).mean() for v in first_x]
    s_out = [d ** 0.5 / v.norm(dim=1).mean() for v in first_y]
    b_dec = torch.stack([(first_y[l] * s_out[l]).mean(0) for l in range(n)]).requires_grad_()
    w_enc, b_enc, w_dec = [], [], []
    for l in range(n):
        writes = n - l
        dec = torch.rand(features, writes, d) * 2 - 1
        dec = dec / dec.norm(dim=-1, keepdim=True) * (0.1 / torch.arange(1, writes + 1).view(1, writes, 1))
        w_enc.append(dec[:, 0, :].T.contiguous().requires_grad_())
        b_enc.append(torch.zeros(features, requires_grad=True))
        w_dec.append(dec.reshape(features, writes * d).contiguous().requires_grad_())
    params = w_enc + b_enc + w_dec + [b_dec]
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    total, warm, decay = args.steps, 100, int(args.steps * 0.2)

    def lr_at(step):
        w = min((step + 1) / warm, 1.0)
        left = total - step
        return args.lr * w * (left / decay if decay > 0 and left < decay else 1.0)

    def picks(pre):
        vals, idx = torch.relu(pre).topk(cands, dim=-1)
        flat = vals.flatten()
        thr = flat.topk(min(k * pre.shape[0], flat.numel())).values[-1].clamp_min(1e-30)
        return vals * (vals >= thr), idx, thr

    def step_loss(xb):
        xs, ys = split(xb)
        preds = [b_dec[t].expand(xb.shape[0], d) for t in range(n)]
        for l in range(n):
            pre = (xs[l] * s_in[l]) @ w_enc[l] + b_enc[l]
            acts, idx, _ = picks(pre)
            if args.variant == "dense":
                dense = torch.zeros_like(pre).scatter(-1, idx, acts)
                out = dense @ w_dec[l]
            else:
                out = F.embedding_bag(idx, w_dec[l], per_sample_weights=acts, mode="sum")
            for j in range(n - l):
                preds[l + j] = preds[l + j] + out[:, j * d:(j + 1) * d]
        return sum(((preds[t] - ys[t] * s_out[t]) ** 2).sum(-1).mean() for t in range(n))

    start = None
    for s in range(args.steps):
        if s == args.warmup:
            start = time.perf_counter()
        lo = (s * batch) % rows
        xb = train[lo:lo + batch]
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        opt.zero_grad(set_to_none=True)
        loss = step_loss(xb)
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start

    with torch.no_grad():
        thresholds = torch.zeros(n)
        for c in range(8):
            lo = ((args.steps + c) * batch) % rows
            xs, _ = split(train[lo:lo + batch])
            for l in range(n):
                thresholds[l] += picks((xs[l] * s_in[l]) @ w_enc[l] + b_enc[l])[2] / 8
        xs, ys = split(evaluation)
        preds = [b_dec[t].expand(evaluation.shape[0], d).clone() for t in range(n)]
        l0 = []
        for l in range(n):
            pre = (xs[l] * s_in[l]) @ w_enc[l] + b_enc[l]
            acts = pre * (pre > thresholds[l])
            l0.append((acts > 0).float().sum(-1).mean().item())
            out = acts @ w_dec[l]
            for j in range(n - l):
                preds[l + j] += out[:, j * d:(j + 1) * d]
        fvu = []
        for t in range(n):
            y = ys[t] * s_out[t]
            fvu.append((((preds[t] - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()).item())
    print(json.dumps({
        "side": f"pytorch {args.variant}",
        "steps": args.steps,
        "batch": batch,
        "tokens_per_second": (args.steps - args.warmup) * batch / elapsed,
        "fvu": sum(fvu) / n,
        "l0": sum(l0) / n,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
