#!/usr/bin/env python3
"""Write SAELens-format SAE fixtures with the real `sae_lens` package, plus reference
inputs/outputs computed by sae_lens, for monoscope's SAE loader tests.

Committed outputs were produced by sae_lens 6.54.12 (torch 2.15.0, CPU, float32); the exact
versions are also stored in each io.safetensors header (`__metadata__.generator`).

Regenerate (sae_lens in a venv that reuses the system torch):
    python3 -m venv --system-site-packages /opt/saelens-venv
    echo "torch==$(python3 -c 'import importlib.metadata as m; print(m.version("torch"))')" > /tmp/c.txt
    /opt/saelens-venv/bin/pip install -c /tmp/c.txt sae_lens
    /opt/saelens-venv/bin/python scripts/saelens_fixtures.py

For every architecture this writes tests/fixtures/saelens/<arch>/:
    cfg.json, sae_weights.safetensors   written by sae_lens itself
    io.safetensors                       x [8, 16], feature_acts = sae.encode(x),
                                         reconstruction = sae.decode(feature_acts), all
                                         float32, computed by the SAE that
                                         SAE.load_from_disk(<dir>) returns

What sae_lens 6.x does at inference (sae_lens/saes/*.py), with
    sae_in = x - b_dec * apply_b_dec_to_input      (SAE.process_sae_in; default True)
    pre    = sae_in @ W_enc + b_enc
    decode(a) = a @ W_dec + b_dec
  standard  acts = relu(pre)
  topk      acts = scatter(topk(pre', k).values.relu()), exactly k kept per token
            (torch.topk; ties broken arbitrarily), ReLU applied AFTER the selection.
            pre' = pre * ||W_dec||_row when cfg.rescale_acts_by_decoder_norm, and then
            decode(a) = (a / ||W_dec||_row) @ W_dec + b_dec; false here (inference default).
  jumprelu  acts = relu(pre) * (pre > threshold)   strict `>`, ReLU applied
  batchtopk there is no inference "batchtopk" class. BatchTopKTrainingSAE
            .save_inference_model() writes architecture "jumprelu" with
            threshold = ones(d_sae) * topk_threshold (one learned scalar, an EMA of the
            smallest positive batch activation); k only survives in
            metadata.training_architecture_details. So inference is the jumprelu formula.
            (The training-time BatchTopK activation is relu first, then top (k * n_tokens)
            over the whole flattened batch.)
  transcoders (sae_lens/saes/transcoder.py): the same encoders with sae_in = x (never
            minus b_dec, which is d_out wide; apply_b_dec_to_input must be False), W_dec
            [d_sae, d_out], b_dec [d_out]; `transcoder` is ReLU, `jumprelu_transcoder`
            JumpReLU, and the `skip_` kinds add x @ W_skip.T (W_skip [d_out, d_in]) in
            forward(). Their io.safetensors also holds output = loaded.forward(x). The hook
            written is metadata.hook_name_out, d_out a top-level key.
"""

import importlib.metadata
import json
import os
import shutil
import sys

# sae_lens builds the batchtopk (inference) cfg.json from a set, so its key order follows the
# string hash seed; pin it so regenerating gives byte-identical files.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})

import torch
from safetensors.torch import save_file

import sae_lens
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import (
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "saelens")
D_IN, D_SAE, K, N = 16, 64, 4, 8
D_OUT = 12  # transcoders write another width than they read
# Smallest allowed distance between a pre-activation and anything it is compared with
# (the k-th/k+1-th largest, a threshold), so float reordering cannot flip a decision.
MARGIN = 1e-3


def metadata() -> SAEMetadata:
    return SAEMetadata(
        model_name="fixture",
        hook_name="blocks.0.mlp.hook_post",
        context_size=32,
    )


def common() -> dict:
    return dict(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu", metadata=metadata())


def transcoder_common() -> dict:
    meta = SAEMetadata(
        model_name="fixture",
        hook_name="blocks.0.mlp.hook_in",
        hook_name_out="blocks.0.hook_mlp_out",
        context_size=32,
    )
    return dict(
        d_in=D_IN,
        d_sae=D_SAE,
        d_out=D_OUT,
        dtype="float32",
        device="cpu",
        apply_b_dec_to_input=False,
        metadata=meta,
    )


@torch.no_grad()
def fill(sae, seed: int, d_out: int = D_IN) -> None:
    """Deterministic non-trivial weights: W_dec rows of norm 0.5..2, nonzero biases (and a
    skip transcoder's W_skip)."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(D_SAE, d_out, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * (0.5 + 1.5 * torch.rand(D_SAE, 1, generator=g))
    sae.W_dec.data.copy_(w_dec)
    sae.W_enc.data.copy_(torch.randn(D_IN, D_SAE, generator=g) * 0.4)
    sae.b_enc.data.copy_(torch.randn(D_SAE, generator=g) * 0.3)
    sae.b_dec.data.copy_(torch.randn(d_out, generator=g) * 0.2)
    if hasattr(sae, "W_skip"):
        sae.W_skip.data.copy_(torch.randn(d_out, D_IN, generator=g) * 0.3)


def inputs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D_IN, generator=g)


def pre_acts(sae, x: torch.Tensor) -> torch.Tensor:
    return (x - sae.b_dec) @ sae.W_enc + sae.b_enc


def topk_gap(pre: torch.Tensor) -> float:
    s = pre.sort(dim=-1, descending=True).values
    return (s[:, K - 1] - s[:, K]).min().item()


def build_standard():
    sae = StandardSAE(StandardSAEConfig(**common()))
    fill(sae, 1)
    return sae, inputs(101)


def build_topk():
    sae = TopKSAE(TopKSAEConfig(k=K, **common()))
    fill(sae, 2)
    # Pick the first input seed whose k-th and (k+1)-th pre-activations are well apart in
    # every row, so there are no ties (nor near-ties) in the selection.
    for seed in range(200, 300):
        x = inputs(seed)
        if topk_gap(pre_acts(sae, x)) > MARGIN:
            return sae, x
    raise RuntimeError("no tie-free input found")


@torch.no_grad()
def thresholds_for(pre: torch.Tensor, seed: int) -> torch.Tensor:
    """Per-latent positive thresholds near the median pre-activation, so roughly half of
    the (token, latent) pairs fire, nudged away from every pre-activation by > MARGIN."""
    g = torch.Generator().manual_seed(seed)
    t = pre.median(dim=0).values.clamp(min=0.05) * (0.8 + 0.4 * torch.rand(D_SAE, generator=g))
    t = t.clamp(min=0.02)
    for _ in range(100):
        close = ((pre - t).abs() <= MARGIN).any(dim=0)
        if not close.any():
            return t
        t = torch.where(close, t + 3 * MARGIN, t)
    raise RuntimeError("thresholds too close to pre-activations")


def build_jumprelu():
    sae = JumpReLUSAE(JumpReLUSAEConfig(**common()))
    fill(sae, 3)
    x = inputs(301)
    with torch.no_grad():
        sae.threshold.data.copy_(thresholds_for(pre_acts(sae, x), 31))
    return sae, x


def build_batchtopk():
    # rescale_acts_by_decoder_norm=False so that save_inference_model keeps W_dec as is
    # (with True it folds the row norms into W_enc/b_enc and W_dec becomes unit norm).
    cfg = BatchTopKTrainingSAEConfig(k=K, rescale_acts_by_decoder_norm=False, **common())
    sae = BatchTopKTrainingSAE(cfg)
    fill(sae, 4)
    x = inputs(401)
    with torch.no_grad():
        pre = pre_acts(sae, x)
        # One scalar threshold (what training learns): the median pre-activation (kept
        # positive), moved off any pre-activation by > MARGIN, so about half fire.
        t = pre.median().clamp(min=0.02)
        while ((pre - t).abs() <= MARGIN).any():
            t = t + 3 * MARGIN
        sae.topk_threshold = torch.tensor(t.item(), dtype=torch.double)
    return sae, x


def build_transcoder(cls, config_cls, seed: int):
    sae = cls(config_cls(**transcoder_common()))
    fill(sae, seed, d_out=D_OUT)
    x = inputs(100 * seed + 1)
    if hasattr(sae, "threshold"):
        with torch.no_grad():
            pre = x @ sae.W_enc + sae.b_enc
            sae.threshold.data.copy_(thresholds_for(pre, 10 * seed + 1))
    return sae, x


BUILDERS = {
    "standard": build_standard,
    "topk": build_topk,
    "batchtopk": build_batchtopk,
    "jumprelu": build_jumprelu,
    "transcoder": lambda: build_transcoder(Transcoder, TranscoderConfig, 5),
    "skip_transcoder": lambda: build_transcoder(SkipTranscoder, SkipTranscoderConfig, 6),
    "jumprelu_transcoder": lambda: build_transcoder(
        JumpReLUTranscoder, JumpReLUTranscoderConfig, 7
    ),
    "jumprelu_skip_transcoder": lambda: build_transcoder(
        JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, 8
    ),
}


@torch.no_grad()
def main() -> None:
    generator = (
        f"scripts/saelens_fixtures.py, sae_lens {sae_lens.__version__}, "
        f"torch {importlib.metadata.version('torch')}"
    )
    for arch, build in BUILDERS.items():
        torch.manual_seed(0)  # sae_lens's own kaiming init, overwritten by fill()
        sae, x = build()
        out = os.path.join(OUT, arch)
        shutil.rmtree(out, ignore_errors=True)
        if arch == "batchtopk":
            sae.save_inference_model(out)
        else:
            sae.save_model(out)
        # Reference outputs from the SAE as sae_lens loads it back, i.e. what a user of
        # this directory gets (for batchtopk: the JumpReLU inference SAE).
        loaded = SAE.load_from_disk(out)
        acts = loaded.encode(x)
        recon = loaded.decode(acts)
        if arch != "batchtopk":
            assert torch.equal(acts, sae.encode(x)), arch
        tensors = {
            "x": x.contiguous(),
            "feature_acts": acts.contiguous(),
            "reconstruction": recon.contiguous(),
        }
        if "transcoder" in arch:
            assert type(loaded) is type(sae), (arch, type(loaded))
            tensors["output"] = loaded(x).contiguous()
        save_file(
            tensors,
            os.path.join(out, "io.safetensors"),
            # One key only: safetensors writes its header metadata in hash order.
            metadata={"generator": f"{generator}, arch {arch}"},
        )
        with open(os.path.join(out, "cfg.json")) as f:
            cfg = json.load(f)
        fired = (acts > 0).float()
        print(
            f"{arch:9s} -> {os.path.relpath(out, ROOT)}: saved as {cfg['architecture']!r} "
            f"({type(loaded).__name__}), active/token {fired.sum(-1).tolist()}, "
            f"fired {fired.mean().item():.2f}, "
            f"W_dec row norms {loaded.W_dec.norm(dim=1).min().item():.2f}.."
            f"{loaded.W_dec.norm(dim=1).max().item():.2f}"
        )


if __name__ == "__main__":
    main()
