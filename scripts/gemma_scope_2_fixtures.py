#!/usr/bin/env python3
"""Write Gemma Scope 2-style SAE, transcoder and cross-layer transcoder folders for the tiny
Gemma 3 fixture (tests/fixtures/models/gemma3_text), in the layout of Google's
`gemma-scope-2-<model>` repositories, each beside the activations of its site and the
encodings and outputs circuit-tracer's Gemma Scope 2 loaders compute from it, for monoscope's
loader tests (tests/gemma_scope_2_fixtures.rs).

Run with a Python that has circuit-tracer 0.5.0, transformers (5.x) and torch, e.g. the one
scripts/circuit_tracer_fixtures.py names:
    /opt/saelens-venv/bin/pip install --no-deps circuit-tracer==0.5.0
    /opt/saelens-venv/bin/python scripts/gemma_scope_2_fixtures.py

Layout (SAELens's Gemma Scope 2 loader reads the same: `get_gemma_3_config_from_hf`):
    <site>/layer_L_width_W_l0_<size>[_affine]/params.safetensors [+ config.json]
    clt/width_W_l0_<size>[_affine]/params_layer_L.safetensors (one file per layer)
params.safetensors holds w_enc [d_in, d_sae], w_dec [d_sae, d_out], b_enc [d_sae], b_dec
[d_out], threshold [d_sae] and, for an affine (skip) transcoder, affine_skip_connection
[d_in, d_out]; a CLT layer's w_dec is [d_sae, n_layers, d_out] (its rows for earlier layers
are zero). The JumpReLU: pre = x @ w_enc + b_enc; acts = pre * (pre > threshold);
out = acts @ w_dec + b_dec (+ x @ affine_skip_connection). config.json, where there is one,
holds what SAELens reads of it: architecture (jump_relu), model_name, hf_hook_point_in and,
for a transcoder, hf_hook_point_out and affine_connection. Without one, the site comes from the
path, as SAELens infers it.

Sites (the transformers module each reads, and monoscope's hook):
    resid_post  model.layers.L.output                              blocks.L.hook_resid_post
    attn_out    model.layers.L.self_attn.o_proj.input              blocks.L.attn.hook_z
    mlp_out     model.layers.L.post_feedforward_layernorm.output   blocks.L.hook_mlp_out
    transcoder  pre_feedforward_layernorm.output → post_feedforward_layernorm.output
                                                  (blocks.L.mlp.hook_in → blocks.L.hook_mlp_out)
    clt         the same pair in every layer

Beside each single SAE or transcoder, io.safetensors holds input_ids, x (the site's
activations in transformers), feature_acts, and reconstruction (an SAE) or y (the MLP's
post-norm output) and output (a transcoder), from circuit-tracer's
`load_gemma_scope_2_transcoder` (encode, then decode with the skip path). Beside the CLT,
io.safetensors holds input_ids, x [n_layers, seq, d_model] and y (every layer's MLP input and
post-norm output), feature_acts [n_layers, seq, d_sae] and output [n_layers, seq, d_model] from
circuit-tracer's `load_gemma_scope_2_clt` (which, in circuit-tracer 0.5, loads the layers
0..max(key) - 1 of the paths it is given: a last dummy key makes it load them all).

The weights are random; b_dec is far from zero, and each latent's threshold is its 85th
percentile pre-activation on the prompt (at least 1e-3), so about one in seven fires.
"""

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_gemma_scope_2_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_gemma_scope_2_transcoder
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "models" / "gemma3_text"
OUT = ROOT / "tests" / "fixtures" / "gemma_scope_2" / "gemma-scope-2-tiny-pt"
PROMPT = "The capital of Japan is Tokyo. 日本の首都は東京です。"
D_SAE = 128
HF_SITES = {
    "resid_post": "model.layers.{L}.output",
    "attn_out": "model.layers.{L}.self_attn.o_proj.input",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
}
# (site, layer, write config.json)
CASES = [("resid_post", 1, True), ("attn_out", 1, False), ("mlp_out", 0, False)]


def capture(model, ids: torch.Tensor) -> dict:
    """Every layer's block output, o_proj input, MLP input (after the pre-MLP norm) and MLP
    output after the post-MLP norm, [seq, width] each."""
    seen = {}
    handles = []
    for layer, block in enumerate(model.model.layers):
        def keep(name, inputs=False, layer=layer):
            def hook(_module, args, outputs=None):
                value = args[0] if inputs else (outputs[0] if isinstance(outputs, tuple) else outputs)
                seen[(name, layer)] = value.detach()[0].float().numpy()
            return hook
        handles.append(block.register_forward_hook(keep("resid_post")))
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(keep("attn_out", inputs=True)))
        handles.append(block.mlp.register_forward_pre_hook(keep("mlp_in", inputs=True)))
        handles.append(block.post_feedforward_layernorm.register_forward_hook(keep("mlp_out")))
    with torch.no_grad():
        model(ids[None])
    for h in handles:
        h.remove()
    return seen


def jumprelu_weights(rng, x: np.ndarray, d_out: int, y_scale: float, y_mean: np.ndarray):
    d_in = x.shape[-1]
    w_enc = (rng.standard_normal((d_in, D_SAE)) / (np.sqrt(d_in) * float(x.std()))).astype(np.float32)
    b_enc = (0.1 * rng.standard_normal(D_SAE)).astype(np.float32)
    pre = x @ w_enc + b_enc
    threshold = np.maximum(np.quantile(pre, 0.85, axis=0), 1e-3).astype(np.float32)
    w_dec = (y_scale * rng.standard_normal((D_SAE, d_out)) / np.sqrt(D_SAE)).astype(np.float32)
    b_dec = (y_mean + 0.5 * y_scale * rng.standard_normal(d_out)).astype(np.float32)
    return w_enc, b_enc, threshold, w_dec, b_dec


def tensors(**arrays) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def write_single(folder: Path, params: dict, config: dict | None, layer: int, io: dict, versions: str):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors(**params), str(folder / "params.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    reference = load_gemma_scope_2_transcoder(
        str(folder / "params.safetensors"), layer, device=torch.device("cpu"), dtype=torch.float32
    )
    x = torch.from_numpy(io["x"])
    with torch.no_grad():
        acts = reference.encode(x)
        out = reference.decode(acts, x)
    arrays = {"input_ids": io["input_ids"], "x": x, "feature_acts": acts}
    if "y" in io:
        arrays |= {"y": torch.from_numpy(io["y"]), "output": out}
    else:
        arrays["reconstruction"] = out
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(folder / "io.safetensors"),
              metadata={"generator": versions})
    fired = float((acts > 0).float().mean())
    print(f"{folder.relative_to(ROOT)}: x {tuple(x.shape)}, {fired:.2f} of latents fire")


def main() -> None:
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ["torch", "transformers", "circuit-tracer", "numpy"]
    )
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    ids = torch.tensor(tokenizer.encode(PROMPT, add_special_tokens=False).ids, dtype=torch.int64)
    seen = capture(model, ids)
    n_layers = len(model.model.layers)

    for seed, (site, layer, with_config) in enumerate(CASES):
        rng = np.random.default_rng(seed)
        x = seen[(site, layer)]
        w_enc, b_enc, threshold, w_dec, b_dec = jumprelu_weights(rng, x, x.shape[-1], float(x.std()), x.mean(0))
        params = dict(w_enc=w_enc, w_dec=w_dec, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
        config = {
            "architecture": "jump_relu",
            "model_name": "gemma-v3-tiny-pt",
            "hf_hook_point_in": HF_SITES[site].format(L=layer),
        } if with_config else None
        folder = OUT / site / f"layer_{layer}_width_{D_SAE}_l0_small"
        write_single(folder, params, config, layer, {"input_ids": ids, "x": x}, versions)

    # A transcoder with an affine skip path, its config naming both hooks.
    layer = 1
    x, y = seen[("mlp_in", layer)], seen[("mlp_out", layer)]
    rng = np.random.default_rng(10)
    w_enc, b_enc, threshold, w_dec, b_dec = jumprelu_weights(rng, x, y.shape[-1], float(y.std()), y.mean(0))
    skip = (0.3 * float(y.std()) / float(x.std()) * rng.standard_normal((x.shape[-1], y.shape[-1])) / np.sqrt(x.shape[-1])).astype(np.float32)
    params = dict(w_enc=w_enc, w_dec=w_dec, b_enc=b_enc, b_dec=b_dec, threshold=threshold, affine_skip_connection=skip)
    config = {
        "architecture": "jump_relu",
        "model_name": "gemma-v3-tiny-pt",
        "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
        "affine_connection": True,
    }
    folder = OUT / "transcoder" / f"layer_{layer}_width_{D_SAE}_l0_small_affine"
    write_single(folder, params, config, layer, {"input_ids": ids, "x": x, "y": y}, versions)

    # A cross-layer transcoder with an affine skip path: one file per layer.
    folder = OUT / "clt" / f"width_{D_SAE}_l0_small_affine"
    folder.mkdir(parents=True, exist_ok=True)
    xs = np.stack([seen[("mlp_in", l)] for l in range(n_layers)])
    ys = np.stack([seen[("mlp_out", l)] for l in range(n_layers)])
    paths = {}
    for l in range(n_layers):
        rng = np.random.default_rng(20 + l)
        w_enc, b_enc, threshold, w_dec_own, b_dec = jumprelu_weights(rng, xs[l], ys.shape[-1], float(ys[l].std()), ys[l].mean(0))
        w_dec = np.zeros((D_SAE, n_layers, ys.shape[-1]), dtype=np.float32)
        for target in range(l, n_layers):
            scale = float(ys[target].std()) / (1 + target - l)
            w_dec[:, target] = scale * rng.standard_normal((D_SAE, ys.shape[-1])) / np.sqrt(D_SAE)
        skip = (0.3 * float(ys[l].std()) / float(xs[l].std()) * rng.standard_normal((xs.shape[-1], ys.shape[-1])) / np.sqrt(xs.shape[-1])).astype(np.float32)
        path = folder / f"params_layer_{l}.safetensors"
        save_file(tensors(w_enc=w_enc, w_dec=w_dec, b_enc=b_enc, b_dec=b_dec, threshold=threshold,
                          affine_skip_connection=skip), str(path))
        paths[l] = str(path)
    paths[n_layers] = paths[n_layers - 1]  # see the docstring: circuit-tracer stops one short
    reference = load_gemma_scope_2_clt(paths, device=torch.device("cpu"), dtype=torch.float32)
    assert reference.n_layers == n_layers, reference.n_layers
    x = torch.from_numpy(xs)
    with torch.no_grad():
        acts = reference.encode(x)
        out = reference.decode(acts.to_sparse(), x)
    save_file(
        {
            "input_ids": ids,
            "x": x.contiguous(),
            "y": torch.from_numpy(ys).contiguous(),
            "feature_acts": acts.contiguous(),
            "output": out.contiguous(),
        },
        str(folder / "io.safetensors"),
        metadata={"generator": versions},
    )
    fired = float((acts > 0).float().mean())
    print(f"{folder.relative_to(ROOT)}: x {tuple(x.shape)}, {fired:.2f} of latents fire")


if __name__ == "__main__":
    main()
