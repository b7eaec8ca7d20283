#!/usr/bin/env python3
"""Write EleutherAI sparsify SAE folders with the real `sparsify` package, each beside the
activations of the hookpoint it names, for monoscope's sparsify loader tests
(tests/sparsify_fixtures.rs).

Regenerate (versions used for the committed files are stored in each io.safetensors header,
`__metadata__.generator`):
    python3 -m venv /opt/sparsify-venv
    /opt/sparsify-venv/bin/pip install torch transformers==5.24.0 eai-sparsify tokenizers safetensors
    /opt/sparsify-venv/bin/python scripts/sparsify_fixtures.py

For each (fixture model, hookpoint) below this writes tests/fixtures/sparsify/<model>/<hookpoint>/:
    cfg.json, sae.safetensors   written by SparseCoder.save_to_disk, the way a sparsify run
                                saves one folder per hookpoint, named after it
    io.safetensors              input_ids [seq] (int64): the prompt's tokens;
                                x [seq, d_in]: what sparsify's trainer captures at the
                                hookpoint — the output (first element of a tuple output) of
                                model.base_model.get_submodule(hookpoint) in
                                transformers, on the fixture model in float32;
                                feature_acts [seq, num_latents]: sae.encode(x), top-k
                                activations scattered into a dense row;
                                reconstruction [seq, d_in]: sae.decode(top_acts, top_indices)

The SAEs are sparsify's own initialisation (encoder: nn.Linear's, W_dec its normalised copy)
with every bias and the decoder perturbed, so a dropped b_dec subtraction, a transposed
encoder or a missing bias cannot pass. One folder is saved in bfloat16; its reference is
computed by that bfloat16 SAE cast to float32 (what monoscope loads it as).
"""

import importlib.metadata
import os
from pathlib import Path

os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # the sparse decoder's eager path (CPU)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "fixtures" / "models"
OUT = ROOT / "tests" / "fixtures" / "sparsify"
PROMPT = "The capital of Japan is Tokyo. 日本の首都は東京です。"
NUM_LATENTS = 80
K = 8

# (fixture model, hookpoint, dtype the SAE is saved in)
CASES = [
    ("gpt_neox", "layers.1", torch.float32),
    ("gpt_neox", "layers.0.attention", torch.float32),
    ("gpt_neox", "layers.1.mlp.act", torch.float32),
    ("gpt2", "h.0.mlp", torch.float32),
    ("gpt2", "h.1.attn", torch.float32),
    ("llama", "layers.0", torch.bfloat16),
    ("llama", "layers.1.self_attn", torch.float32),
    ("llama", "layers.1.mlp", torch.float32),
]


def capture(model, hookpoint: str, ids: torch.Tensor) -> torch.Tensor:
    """The hookpoint module's output, as sparsify's trainer hooks it."""
    seen = {}

    def hook(_module, _inputs, outputs):
        if isinstance(outputs, tuple):
            outputs = outputs[0]
        seen["x"] = outputs.detach()

    handle = model.base_model.get_submodule(hookpoint).register_forward_hook(hook)
    with torch.no_grad():
        model(ids[None])
    handle.remove()
    return seen["x"][0]


def perturbed_sae(d_in: int, x: torch.Tensor, seed: int) -> SparseCoder:
    torch.manual_seed(seed)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=NUM_LATENTS, k=K))
    with torch.no_grad():
        scale = x.std().item()
        sae.b_dec.copy_(x.mean(0) + 0.3 * scale * torch.randn(d_in))
        sae.encoder.bias.normal_(0.0, 0.1 * scale)
        sae.W_dec.add_(0.1 * torch.randn_like(sae.W_dec))
    return sae


def main() -> None:
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ["eai-sparsify", "torch", "transformers"]
    )
    for i, (model_name, hookpoint, dtype) in enumerate(CASES):
        folder = MODELS / model_name
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        ids = torch.tensor(tokenizer.encode(PROMPT, add_special_tokens=False).ids)
        x = capture(model, hookpoint, ids)
        sae = perturbed_sae(x.shape[-1], x, seed=i)
        out = OUT / model_name / hookpoint
        sae.to(dtype).save_to_disk(out)
        sae = SparseCoder.load_from_disk(out).to(torch.float32)
        with torch.no_grad():
            top_acts, top_indices, _ = sae.encode(x)
            feature_acts = torch.zeros(x.shape[0], NUM_LATENTS).scatter_(-1, top_indices, top_acts)
            reconstruction = sae.decode(top_acts, top_indices)
        save_file(
            {
                "input_ids": ids.to(torch.int64),
                "x": x.contiguous(),
                "feature_acts": feature_acts.contiguous(),
                "reconstruction": reconstruction.contiguous(),
            },
            str(out / "io.safetensors"),
            metadata={"generator": versions, "hookpoint": hookpoint},
        )
        print(f"{out.relative_to(ROOT)}: x {tuple(x.shape)}, {dtype}")


if __name__ == "__main__":
    main()
