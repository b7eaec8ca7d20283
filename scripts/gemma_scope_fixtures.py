#!/usr/bin/env python3
"""Write Gemma Scope-style SAE folders (`params.npz`: W_enc, W_dec, b_enc, b_dec, threshold)
for the tiny Gemma 2 fixture, in the layout of Google's Hugging Face repositories
(gemma-scope-<model>-<site>/layer_L/width_W/average_l0_N/params.npz), each beside the
activations of its site and the encodings of Gemma Scope's reference JumpReLU, for
monoscope's Gemma Scope loader tests (tests/gemma_scope_fixtures.rs).

Regenerate:
    /opt/sparsify-venv/bin/pip install torch transformers==5.24.0 numpy safetensors tokenizers
    /opt/sparsify-venv/bin/python scripts/gemma_scope_fixtures.py [--transcoders]

Sites, as Gemma Scope names them (and the TransformerLens hook each reads):
    res  the residual stream after block L (`blocks.L.hook_resid_post`): the decoder layer's
         output in transformers;
    mlp  block L's MLP output after Gemma 2's post-MLP norm (`blocks.L.hook_mlp_out`): the
         output of post_feedforward_layernorm;
    att  block L's attention heads' concatenated outputs before the output projection
         (`blocks.L.attn.hook_z`): the input of o_proj.
Beside each params.npz, io.safetensors holds input_ids [seq] (int64), x [seq, d_in] (the site's
activations in transformers, float32), feature_acts [seq, d_sae] and reconstruction
[seq, d_in], from the reference code of Gemma Scope's tutorial:
    pre = x @ W_enc + b_enc;  acts = (pre > threshold) * relu(pre);  recon = acts @ W_dec + b_dec
(no b_dec subtracted from the input). The weights are random; b_dec is far from zero so a
subtraction that should not happen cannot pass, and each latent's threshold is its 85th
percentile pre-activation on the prompt, so about one in seven fires. The `mlp` folder is
written with np.savez_compressed (deflate), the others with np.savez (stored).

Transcoders (gemma-scope-<model>-transcoders/layer_L/…, the same params.npz arrays with W_dec
[d_sae, d_out] and b_dec [d_out]) read block L's MLP input (after the pre-MLP norm: the input
of `mlp`, monoscope's `blocks.L.mlp.hook_in`) and predict its output after the post-MLP norm
(`blocks.L.hook_mlp_out`); their io.safetensors holds input_ids, x (the MLP input), y (the
post-norm MLP output), feature_acts and output = acts @ W_dec + b_dec. With --transcoders only
the transcoder folder is rewritten.
"""

import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "models" / "gemma2"
OUT = ROOT / "tests" / "fixtures" / "gemma_scope"
PROMPT = "The capital of Japan is Tokyo. 日本の首都は東京です。"
D_SAE = 128

# (site, layer, compressed); the folder's average_l0 is the mean L0 on the prompt, rounded.
CASES = [("res", 1, False), ("mlp", 0, True), ("att", 1, False)]


def capture(model, site: str, layer: int, ids: torch.Tensor) -> torch.Tensor:
    block = model.model.layers[layer]
    seen = {}
    if site == "att":
        def pre_hook(_module, args):
            seen["x"] = args[0].detach()
        handle = block.self_attn.o_proj.register_forward_pre_hook(pre_hook)
    else:
        module = block if site == "res" else block.post_feedforward_layernorm

        def hook(_module, _inputs, outputs):
            seen["x"] = (outputs[0] if isinstance(outputs, tuple) else outputs).detach()
        handle = module.register_forward_hook(hook)
    with torch.no_grad():
        model(ids[None])
    handle.remove()
    return seen["x"][0]


def capture_mlp_io(model, layer: int, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Block `layer`'s MLP input and its output after the post-MLP norm."""
    block = model.model.layers[layer]
    seen = {}

    def pre_hook(_module, args):
        seen["x"] = args[0].detach()

    def hook(_module, _inputs, outputs):
        seen["y"] = outputs.detach()

    handles = [
        block.mlp.register_forward_pre_hook(pre_hook),
        block.post_feedforward_layernorm.register_forward_hook(hook),
    ]
    with torch.no_grad():
        model(ids[None])
    for h in handles:
        h.remove()
    return seen["x"][0].numpy().astype(np.float32), seen["y"][0].numpy().astype(np.float32)


def write_transcoder(model, ids: torch.Tensor, versions: str, layer: int = 1) -> None:
    x, y = capture_mlp_io(model, layer, ids)
    rng = np.random.default_rng(10)
    d_in, d_out = x.shape[-1], y.shape[-1]
    w_enc = (rng.standard_normal((d_in, D_SAE)) / (np.sqrt(d_in) * float(x.std()))).astype(np.float32)
    w_dec = (float(y.std()) * rng.standard_normal((D_SAE, d_out))).astype(np.float32)
    b_enc = (0.1 * rng.standard_normal(D_SAE)).astype(np.float32)
    b_dec = (y.mean(0) + 0.5 * float(y.std()) * rng.standard_normal(d_out)).astype(np.float32)
    pre = x @ w_enc + b_enc
    threshold = np.maximum(np.quantile(pre, 0.85, axis=0), 1e-3).astype(np.float32)
    acts = ((pre > threshold) * np.maximum(pre, 0)).astype(np.float32)
    output = (acts @ w_dec + b_dec).astype(np.float32)
    l0 = round(float((acts > 0).sum(1).mean()))
    out = OUT / "gemma-scope-tiny-pt-transcoders" / f"layer_{layer}" / f"width_{D_SAE}" / f"average_l0_{l0}"
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "params.npz", W_enc=w_enc, W_dec=w_dec, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
    save_file(
        {
            "input_ids": ids.to(torch.int64),
            "x": torch.from_numpy(x).contiguous(),
            "y": torch.from_numpy(y).contiguous(),
            "feature_acts": torch.from_numpy(acts).contiguous(),
            "output": torch.from_numpy(output).contiguous(),
        },
        str(out / "io.safetensors"),
        metadata={"generator": versions, "site": "transcoders", "layer": str(layer)},
    )
    print(f"{out.relative_to(ROOT)}: x {x.shape}, y {y.shape}")


def main() -> None:
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ["torch", "transformers", "numpy"])
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    ids = torch.tensor(tokenizer.encode(PROMPT, add_special_tokens=False).ids)
    only_transcoders = sys.argv[1:] == ["--transcoders"]
    for seed, (site, layer, compressed) in enumerate([] if only_transcoders else CASES):
        x = capture(model, site, layer, ids).numpy().astype(np.float32)
        d_in = x.shape[-1]
        rng = np.random.default_rng(seed)
        scale = float(x.std())
        w_enc = (rng.standard_normal((d_in, D_SAE)) / np.sqrt(d_in)).astype(np.float32)
        w_dec = rng.standard_normal((D_SAE, d_in)).astype(np.float32)
        w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
        b_enc = (0.1 * scale * rng.standard_normal(D_SAE)).astype(np.float32)
        b_dec = (x.mean(0) + 0.5 * scale * rng.standard_normal(d_in)).astype(np.float32)
        pre = x @ w_enc + b_enc
        threshold = np.maximum(np.quantile(pre, 0.85, axis=0), 1e-3).astype(np.float32)
        acts = ((pre > threshold) * np.maximum(pre, 0)).astype(np.float32)
        recon = (acts @ w_dec + b_dec).astype(np.float32)
        l0 = round(float((acts > 0).sum(1).mean()))
        out = OUT / f"gemma-scope-tiny-pt-{site}" / f"layer_{layer}" / f"width_{D_SAE}" / f"average_l0_{l0}"
        out.mkdir(parents=True, exist_ok=True)
        save = np.savez_compressed if compressed else np.savez
        save(out / "params.npz", W_enc=w_enc, W_dec=w_dec, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
        save_file(
            {
                "input_ids": ids.to(torch.int64),
                "x": torch.from_numpy(x).contiguous(),
                "feature_acts": torch.from_numpy(acts).contiguous(),
                "reconstruction": torch.from_numpy(recon).contiguous(),
            },
            str(out / "io.safetensors"),
            metadata={"generator": versions, "site": site, "layer": str(layer)},
        )
        print(f"{out.relative_to(ROOT)}: x {x.shape}")
    write_transcoder(model, ids, versions)


if __name__ == "__main__":
    main()
