#!/usr/bin/env python3
"""circuit-tracer 0.5.0's `attribute` on a GPT-2-architecture Hugging Face folder with a folder
of per-layer transcoders as monoscope saves them (SAELens `jumprelu_skip_transcoder` or
`jumprelu_transcoder` folders `layer_L`), or a cross-layer transcoder in circuit-tracer's own
format (W_enc_L / W_dec_L files, loaded by its `load_clt` with lazy decoders, its default), for
benches/compare_attribution.sh.

A transcoder reading monoscope's `blocks.L.mlp.hook_in` (the MLP's input after the norm's gain
and bias) is given to circuit-tracer at `ln2.hook_normalized` (before them) with the gain and
bias folded into its encoder and skip path, which is exact:
  W_enc' = diag(w)·W_enc, b_enc' = b_enc + b·W_enc, W_skip' = W_skip·diag(w),
  b_dec' = b_dec + W_skip·b.
Prints JSON: the seconds `attribute` took (model and transcoders loaded), the process's peak
resident memory, and the node counts;
writes the unpruned graph as safetensors under the names `monoscope attribute --adjacency` uses.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import circuit_tracer_fixtures as ct  # noqa: E402  (also patches huggingface-hub for 0.5.0)

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from circuit_tracer import attribute  # noqa: E402
from circuit_tracer.transcoder.activation_functions import JumpReLU  # noqa: E402
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt  # noqa: E402
from circuit_tracer.transcoder.single_layer_transcoder import (  # noqa: E402
    SingleLayerTranscoder,
    TranscoderSet,
)


def load_transcoder(folder, model):
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.float() for k, v in load_file(folder / "sae_weights.safetensors").items()}
    hook = cfg["metadata"]["hook_name"]
    layer = int(hook.split(".")[1])
    if hook.endswith("mlp.hook_in"):
        gain, bias = model.blocks[layer].ln2.w.detach(), model.blocks[layer].ln2.b.detach()
        w["b_enc"] = w["b_enc"] + bias @ w["W_enc"]
        w["W_enc"] = gain[:, None] * w["W_enc"]
        if "W_skip" in w:
            w["b_dec"] = w["b_dec"] + w["W_skip"] @ bias
            w["W_skip"] = w["W_skip"] * gain[None, :]
    elif not hook.endswith("ln2.hook_normalized"):
        sys.exit(f"{folder}: reads {hook}; this script takes mlp.hook_in or ln2.hook_normalized")
    d_model, d_sae = w["W_enc"].shape
    t = SingleLayerTranscoder(
        d_model,
        d_sae,
        JumpReLU(w["threshold"].clone()),
        layer,
        skip_connection="W_skip" in w,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with torch.no_grad():
        t.W_enc.copy_(w["W_enc"].T)
        t.W_dec.copy_(w["W_dec"])
        t.b_enc.copy_(w["b_enc"])
        t.b_dec.copy_(w["b_dec"])
        if "W_skip" in w:
            t.W_skip.copy_(w["W_skip"])
    return layer, t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--transcoders", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--out", required=True, help="the unpruned graph (safetensors)")
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args()
    model, tokenizer, c = ct.hooked_gpt2(args.model)
    if (Path(args.transcoders) / "W_enc_0.safetensors").is_file():
        replacement = load_clt(
            args.transcoders,
            feature_input_hook="hook_resid_mid",
            feature_output_hook="hook_mlp_out",
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
    else:
        folders = sorted(p for p in Path(args.transcoders).iterdir() if (p / "cfg.json").is_file())
        replacement = TranscoderSet(
            dict(load_transcoder(f, model) for f in folders),
            feature_input_hook="ln2.hook_normalized",
            feature_output_hook="hook_mlp_out",
            scan="monoscope",
        )
    model._configure_replacement_model(replacement)
    ids = torch.tensor([c.bos_token_id] + tokenizer.encode(args.prompt), dtype=torch.long)
    started = time.perf_counter()
    graph = attribute(ids, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    tensors = {
        "input_ids": ids,
        "active_features": graph.active_features[graph.selected_features].long(),
        "activation_values": graph.activation_values[graph.selected_features].float(),
        "logit_tokens": torch.tensor([t.vocab_idx for t in graph.logit_targets], dtype=torch.long),
        "logit_probabilities": graph.logit_probabilities.float(),
        "adjacency": graph.adjacency_matrix.float(),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "threads": torch.get_num_threads(),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "active_features": int(len(graph.selected_features)),
                "nodes": int(graph.adjacency_matrix.shape[0]),
            }
        )
    )


if __name__ == "__main__":
    main()
