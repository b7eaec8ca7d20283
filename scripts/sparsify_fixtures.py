#!/usr/bin/env python3
"""Write EleutherAI sparsify SAE folders with the real `sparsify` package, each beside the
activations of the hookpoint it names, for monoscope's sparsify loader tests
(tests/sparsify_fixtures.rs).

Regenerate (versions used for the committed files are stored in each io.safetensors header,
`__metadata__.generator`):
    python3 -m venv /opt/sparsify-venv
    /opt/sparsify-venv/bin/pip install torch transformers==5.24.0 eai-sparsify tokenizers safetensors
    /opt/sparsify-venv/bin/python scripts/sparsify_fixtures.py [--transcoders]
(--transcoders rewrites the transcoder folders only.)

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

Transcoders (SparseCoderConfig(transcode=True), some with skip_connection) go to
tests/fixtures/sparsify/transcoders/<model>/<hookpoint>/, with an io.safetensors holding
    input_ids, x [seq, d_in]: the hookpoint module's input (what sparsify's trainer feeds a
                              transcoder), y [seq, d_in]: its output (the target),
    feature_acts [seq, num_latents], output [seq, d_in]: sae(x, y).sae_out, skip path included

The SAEs are sparsify's own initialisation (encoder: nn.Linear's, W_dec its normalised copy)
with every bias and the decoder perturbed, so a dropped b_dec subtraction, a transposed
encoder or a missing bias cannot pass. One folder is saved in bfloat16; its reference is
computed by that bfloat16 SAE cast to float32 (what monoscope loads it as).
"""

import importlib.metadata
import os
import sys
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

# (fixture model, hookpoint, skip_connection) of the transcoders
TRANSCODER_CASES = [
    ("gpt2", "h.0.mlp", False),
    ("llama", "layers.1.mlp", True),
    ("gpt_neox", "layers.1.mlp.act", True),
]

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


def capture_io(model, hookpoint: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hookpoint module's input and output, as sparsify's trainer hooks them."""
    seen = {}

    def hook(_module, args, kwargs, outputs):
        if isinstance(outputs, tuple):
            outputs = outputs[0]
        # Decoder layers take their input as the keyword `hidden_states`.
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
        seen["y"] = outputs.detach()

    module = model.base_model.get_submodule(hookpoint)
    handle = module.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids[None])
    handle.remove()
    return seen["x"][0], seen["y"][0]


def capture(model, hookpoint: str, ids: torch.Tensor) -> torch.Tensor:
    """The hookpoint module's output, as sparsify's trainer hooks it."""
    return capture_io(model, hookpoint, ids)[1]


def perturbed_transcoder(x: torch.Tensor, y: torch.Tensor, skip: bool, seed: int) -> SparseCoder:
    """sparsify's transcoder initialisation (W_dec and W_skip zero) with every weight
    perturbed, so that a dropped skip path, bias or transposition cannot pass."""
    torch.manual_seed(seed)
    d_in = x.shape[-1]
    cfg = SparseCoderConfig(num_latents=NUM_LATENTS, k=K, transcode=True, skip_connection=skip)
    sae = SparseCoder(d_in, cfg)
    with torch.no_grad():
        scale = y.std().item()
        sae.b_dec.copy_(y.mean(0) + 0.3 * scale * torch.randn(d_in))
        sae.encoder.bias.normal_(0.0, 0.1 * x.std().item())
        sae.W_dec.normal_(0.0, scale)
        if skip:
            sae.W_skip.normal_(0.0, scale / (x.std().item() * d_in**0.5))
    return sae


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
    only_transcoders = sys.argv[1:] == ["--transcoders"]
    for i, (model_name, hookpoint, dtype) in enumerate([] if only_transcoders else CASES):
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
    for i, (model_name, hookpoint, skip) in enumerate(TRANSCODER_CASES):
        folder = MODELS / model_name
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        ids = torch.tensor(tokenizer.encode(PROMPT, add_special_tokens=False).ids)
        x, y = capture_io(model, hookpoint, ids)
        sae = perturbed_transcoder(x, y, skip, seed=100 + i)
        out = OUT / "transcoders" / model_name / hookpoint
        sae.save_to_disk(out)
        sae = SparseCoder.load_from_disk(out)
        with torch.no_grad():
            top_acts, top_indices, _ = sae.encode(x)
            feature_acts = torch.zeros(x.shape[0], NUM_LATENTS).scatter_(-1, top_indices, top_acts)
            output = sae(x, y).sae_out
        save_file(
            {
                "input_ids": ids.to(torch.int64),
                "x": x.contiguous(),
                "y": y.contiguous(),
                "feature_acts": feature_acts.contiguous(),
                "output": output.contiguous(),
            },
            str(out / "io.safetensors"),
            metadata={"generator": versions, "hookpoint": hookpoint},
        )
        print(f"{out.relative_to(ROOT)}: x {tuple(x.shape)}, skip {skip}")


if __name__ == "__main__":
    main()
