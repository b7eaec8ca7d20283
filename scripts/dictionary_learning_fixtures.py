#!/usr/bin/env python3
"""Write SAE folders as Sam Marks's dictionary_learning saves them (what SAEBench's SAE suites
and their Hugging Face repositories hold: `ae.pt`, a torch.save of the dictionary's
state_dict, beside `config.json`), one per dictionary class, for the GPT-2 fixture
(tests/fixtures/models/gpt2), each beside the activations it reads and the encodings and
reconstructions dictionary_learning's own classes compute from them, for monoscope's loader
tests (tests/dictionary_learning_fixtures.rs).

Run with a Python that has torch, transformers, einops and dictionary-learning 0.1.0, e.g.
    /opt/saelens-venv/bin/pip install --no-deps dictionary-learning==0.1.0
    /opt/saelens-venv/bin/python scripts/dictionary_learning_fixtures.py
(dictionary_learning imports nnsight for its activation buffer alone; the script stands a stub
in for it, as nothing here runs the buffer.)

Folders, laid out as SAEBench's repositories are (`<model>_<site>_layer_L/trainer_N/`):
    AutoEncoder             encoder.weight [d_sae, d_in], encoder.bias, decoder.weight
                            [d_in, d_sae], bias (b_dec): relu((x - b_dec) @ W_enc + b_enc)
    JumpReluAutoEncoder     W_enc [d_in, d_sae], b_enc, W_dec, b_dec, threshold [d_sae]:
                            pre = x @ W_enc + b_enc (b_dec not subtracted); relu(pre·[pre > θ])
    AutoEncoderTopK         the AutoEncoder's tensors with b_dec, k and threshold buffers: the
                            k largest of relu((x - b_dec) @ W_enc + b_enc) per token
    BatchTopKSAE            the same tensors; at inference relu(pre)·[relu(pre) > θ] with the
                            saved scalar threshold θ
    MatryoshkaBatchTopKSAE  W_enc, b_enc, W_dec, b_dec, k, threshold, group_sizes: BatchTopK's
                            inference with every group active
config.json holds the trainer's dict_class, activation_dim, dict_size, k, layer, lm_name and
submodule_name, and the buffer's ctx_len. io.safetensors holds input_ids, x (the block's output
in transformers: monoscope's blocks.L.hook_resid_post), feature_acts (the class's encode) and
reconstruction (its decode). The weights are random, b_dec far from zero, and thresholds at
the 85th percentile of the prompt's pre-activations.
"""

import importlib.metadata
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.modules.setdefault("nnsight", types.SimpleNamespace(LanguageModel=object))

from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder  # noqa: E402
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE  # noqa: E402
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE  # noqa: E402
from dictionary_learning.trainers.top_k import AutoEncoderTopK  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "models" / "gpt2"
OUT = ROOT / "tests" / "fixtures" / "dictionary_learning" / "gpt2-tiny_resid_post_layer_1"
PROMPT = "The capital of Japan is Tokyo. 日本の首都は東京です。"
LAYER = 1
D_SAE = 128
K = 12


def randomise(ae, x: torch.Tensor, gen: torch.Generator) -> None:
    """Random weights at the scale of `x`, b_dec far from zero, and each threshold at the
    85th percentile of the prompt's pre-activations."""
    d_in = x.shape[-1]
    scale = float(x.std())
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if name in ("bias", "b_dec"):
                p.copy_(x.mean(0) + 0.5 * scale * torch.randn(p.shape, generator=gen))
            elif name in ("encoder.weight", "W_enc"):
                p.copy_(torch.randn(p.shape, generator=gen) / (np.sqrt(d_in) * scale))
            elif name in ("decoder.weight", "W_dec"):
                p.copy_(scale * torch.randn(p.shape, generator=gen) / np.sqrt(D_SAE))
            elif name in ("encoder.bias", "b_enc"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        if hasattr(ae, "threshold"):
            b_dec = getattr(ae, "b_dec", None)
            shifted = x if isinstance(ae, JumpReluAutoEncoder) else x - b_dec
            if hasattr(ae, "encoder"):
                pre = ae.encoder(shifted)
            else:
                pre = shifted @ ae.W_enc + ae.b_enc
            per_latent = torch.quantile(pre, 0.85, dim=0).clamp(min=1e-3)
            if ae.threshold.ndim == 0:
                ae.threshold.copy_(per_latent.median())
            else:
                ae.threshold.copy_(per_latent)


def main() -> None:
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ["torch", "transformers", "dictionary-learning"]
    )
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    ids = torch.tensor(tokenizer.encode(PROMPT, add_special_tokens=False).ids, dtype=torch.int64)
    seen = {}
    block = model.transformer.h[LAYER]
    handle = block.register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("x", (out[0] if isinstance(out, tuple) else out).detach()[0])
    )
    with torch.no_grad():
        model(ids[None])
    handle.remove()
    x = seen["x"].float()
    d_in = x.shape[-1]
    dictionaries = [
        ("AutoEncoder", AutoEncoder(d_in, D_SAE), None),
        ("JumpReluAutoEncoder", JumpReluAutoEncoder(d_in, D_SAE), None),
        ("AutoEncoderTopK", AutoEncoderTopK(d_in, D_SAE, K), K),
        ("BatchTopKSAE", BatchTopKSAE(d_in, D_SAE, K), K),
        ("MatryoshkaBatchTopKSAE", MatryoshkaBatchTopKSAE(d_in, D_SAE, K, [16, 48, 64]), K),
    ]
    for trainer, (dict_class, ae, k) in enumerate(dictionaries):
        gen = torch.Generator().manual_seed(100 + trainer)
        randomise(ae, x, gen)
        folder = OUT / f"trainer_{trainer}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(ae.state_dict(), folder / "ae.pt")
        config = {
            "trainer": {
                "dict_class": dict_class,
                "activation_dim": d_in,
                "dict_size": D_SAE,
                "layer": LAYER,
                "lm_name": "monoscope/gpt2-tiny",
                "submodule_name": f"resid_post_layer_{LAYER}",
            },
            "buffer": {"ctx_len": 128},
        }
        if k is not None:
            config["trainer"]["k"] = k
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        with torch.no_grad():
            acts = ae.encode(x)
            recon = ae.decode(acts)
        save_file(
            {
                "input_ids": ids,
                "x": x.contiguous(),
                "feature_acts": acts.contiguous(),
                "reconstruction": recon.contiguous(),
            },
            str(folder / "io.safetensors"),
            metadata={"generator": versions, "dict_class": dict_class},
        )
        fired = float((acts > 0).float().mean())
        print(f"{folder.relative_to(ROOT)}: {dict_class}, {fired:.2f} of latents fire")


if __name__ == "__main__":
    main()
