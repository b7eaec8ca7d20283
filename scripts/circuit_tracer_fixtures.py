#!/usr/bin/env python3
"""Reference attribution graphs from circuit-tracer itself, for `tests/attribution.rs`.

Builds the GPT-2 fixture model (tests/fixtures/models/gpt2) as a TransformerLens
HookedTransformer (weights converted by TransformerLens, layer norms not folded, as
circuit-tracer loads models), gives it one random JumpReLU skip transcoder per layer (from
`blocks.L.ln2.hook_normalized`, which unfolded is monoscope's `blocks.L.mlp.hook_in`, to
`blocks.L.hook_mlp_out`), runs circuit-tracer's `attribute` on fixed prompts, and writes:

  OUT/transcoders/layer_L/   each transcoder as a SAELens `jumprelu_skip_transcoder` folder
  OUT/graphs.safetensors     per prompt i: `i.input_ids`, `i.active_features` [n, 3] (layer,
                             position, feature), `i.activation_values`, `i.logit_tokens`,
                             `i.logit_probabilities` and `i.adjacency` (circuit-tracer's
                             unpruned adjacency matrix); `i.node_mask`, `i.edge_mask`
                             and `i.cumulative_scores` of its `prune_graph` at 0.8 / 0.98,
                             and `i.scores` (replacement, completeness); `limited.*`, the
                             first prompt's graph with a feature-node limit; `clt.*`, the
                             first prompt's graph through the cross-layer transcoder below
  OUT/transcoder_set/        the same per-layer transcoders as circuit-tracer saves them
                             (`SingleLayerTranscoder.to_safetensors`, layer_L.safetensors),
                             with the `config.yaml` its Hugging Face repositories carry
  OUT/clt/                   a random JumpReLU cross-layer transcoder reading
                             `blocks.L.hook_resid_mid`, written by circuit-tracer's own
                             `CrossLayerTranscoder.to_safetensors` (W_enc_L / W_dec_L files),
                             with the `config.yaml` its Hugging Face repositories carry

Run with a Python that has circuit-tracer 0.5.0, TransformerLens and transformers, e.g.
    /opt/saelens-venv/bin/pip install --no-deps circuit-tracer==0.5.0
    /opt/saelens-venv/bin/python scripts/circuit_tracer_fixtures.py
(circuit-tracer 0.5.0 pins transformers<=4.57.3 and huggingface-hub<1; it runs with
transformers 5 and huggingface-hub 1 once the one constant it imports from the hub exists,
which this script supplies.)
"""

import argparse
import json
import os
from pathlib import Path

import huggingface_hub.constants as hub_constants

# circuit-tracer 0.5.0 imports a constant huggingface-hub 1.x no longer defines.
if not hasattr(hub_constants, "HF_HUB_ENABLE_HF_TRANSFER"):
    hub_constants.HF_HUB_ENABLE_HF_TRANSFER = False

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights  # noqa: E402
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from circuit_tracer import attribute  # noqa: E402
from circuit_tracer.graph import compute_graph_scores, prune_graph  # noqa: E402
from circuit_tracer.replacement_model.replacement_model_transformerlens import (  # noqa: E402
    TransformerLensReplacementModel,
)
from circuit_tracer.transcoder.activation_functions import JumpReLU  # noqa: E402
from circuit_tracer.transcoder.cross_layer_transcoder import (  # noqa: E402
    CrossLayerTranscoder,
    load_clt,
)
from circuit_tracer.transcoder.single_layer_transcoder import (  # noqa: E402
    SingleLayerTranscoder,
    TranscoderSet,
)

PROMPTS = ["The capital of Japan is", "日本の首都は東京"]
D_TRANSCODER = 32
THRESHOLD = 0.3
# The graph made with a feature-node limit: at most this many features, ranked in batches of this.
LIMITED_FEATURES = 40
LIMITED_BATCH = 8


def transcoder(layer, d_model, generator):
    """A random JumpReLU skip transcoder (float32), its weights as SAELens names them."""
    g = lambda *shape, scale: (torch.rand(*shape, generator=generator) * 2 - 1) * scale  # noqa: E731
    return {
        "W_enc": g(d_model, D_TRANSCODER, scale=0.8),  # SAELens: [d_in, d_sae]
        "W_dec": g(D_TRANSCODER, d_model, scale=0.5),
        "b_enc": g(D_TRANSCODER, scale=0.2),
        "b_dec": g(d_model, scale=0.2),
        "threshold": torch.full((D_TRANSCODER,), THRESHOLD),
        "W_skip": g(d_model, d_model, scale=0.15),  # [d_out, d_in]
    }


def save_saelens(weights, layer, d_model, out):
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "sae_weights.safetensors")
    cfg = {
        "d_in": d_model,
        "d_sae": D_TRANSCODER,
        "d_out": d_model,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": "jumprelu_skip_transcoder",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "sae_lens_training_version": "6.54.12",
            "model_name": "gpt2-fixture",
            "hook_name": f"blocks.{layer}.ln2.hook_normalized",
            "hook_name_out": f"blocks.{layer}.hook_mlp_out",
            "context_size": 32,
        },
    }
    (out / "cfg.json").write_text(json.dumps(cfg))


def circuit_tracer_transcoder(weights, layer, d_model):
    t = SingleLayerTranscoder(
        d_model,
        D_TRANSCODER,
        JumpReLU(weights["threshold"].clone()),
        layer,
        skip_connection=True,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with torch.no_grad():
        t.W_enc.copy_(weights["W_enc"].T)  # circuit-tracer: [d_transcoder, d_model]
        t.W_dec.copy_(weights["W_dec"])
        t.b_enc.copy_(weights["b_enc"])
        t.b_dec.copy_(weights["b_dec"])
        t.W_skip.copy_(weights["W_skip"])
    return t


def cross_layer_transcoder(
    model, ids, n_layers, d_model, generator, width=D_TRANSCODER, threshold=THRESHOLD
):
    """A random JumpReLU cross-layer transcoder (float32) from `hook_resid_mid` to every later
    `hook_mlp_out`, `width` features a layer, its encoder scaled to the residual stream's size
    on `ids` (pre-activations of about unit size; `threshold` sets how many fire)."""
    _, cache = model.run_with_cache(ids[None])
    resid = torch.stack([cache[f"blocks.{l}.hook_resid_mid"][0, 1:] for l in range(n_layers)])
    # Pre-activations of about unit size.
    enc_scale = 1.7 / (resid.norm(dim=-1).mean().item())
    g = lambda *shape, scale: (torch.rand(*shape, generator=generator) * 2 - 1) * scale  # noqa: E731
    clt = CrossLayerTranscoder(
        n_layers,
        width,
        d_model,
        activation_function="jump_relu",
        lazy_decoder=False,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with torch.no_grad():
        clt.W_enc.copy_(g(n_layers, width, d_model, scale=enc_scale))
        clt.b_enc.copy_(g(n_layers, width, scale=0.2))
        clt.b_dec.copy_(g(n_layers, d_model, scale=0.2))
        for i in range(n_layers):
            clt.W_dec[i].copy_(g(width, n_layers - i, d_model, scale=0.5))
        clt.activation_function.threshold.fill_(threshold)
    return clt


def hooked_gpt2(model_dir):
    """A GPT-2 Hugging Face folder as circuit-tracer's TransformerLens replacement model (not
    yet given transcoders; layer norms not folded), its tokenizer (BOS named) and HF config."""
    hf = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False,
        device="cpu",
        dtype=torch.float32,
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    # The BOS token starts every prompt (circuit-tracer puts a special token first and leaves
    # its position out of the graph); naming it makes circuit-tracer see it as special.
    tokenizer.bos_token = tokenizer.convert_ids_to_tokens(c.bos_token_id)
    model = TransformerLensReplacementModel(cfg)
    model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    model.tokenizer = tokenizer  # (set_tokenizer would reload it by name)
    model.eval()
    return model, tokenizer, c


def main():
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(root / "tests/fixtures/models/gpt2"))
    ap.add_argument("--out", default=str(root / "tests/fixtures/circuit_tracer/gpt2"))
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    model, tokenizer, c = hooked_gpt2(args.model)
    generator = torch.Generator().manual_seed(1)
    per_layer = [transcoder(l, c.n_embd, generator) for l in range(c.n_layer)]
    for layer, w in enumerate(per_layer):
        save_saelens(w, layer, c.n_embd, out / "transcoders" / f"layer_{layer}")
    transcoders = TranscoderSet(
        {l: circuit_tracer_transcoder(w, l, c.n_embd) for l, w in enumerate(per_layer)},
        feature_input_hook="ln2.hook_normalized",
        feature_output_hook="hook_mlp_out",
        scan="gpt2-fixture",
    )
    model._configure_replacement_model(transcoders)
    # The same transcoders in circuit-tracer's own per-layer format.
    set_dir = out / "transcoder_set"
    set_dir.mkdir(parents=True, exist_ok=True)
    for layer in range(c.n_layer):
        transcoders.transcoders[layer].to_safetensors(str(set_dir / f"layer_{layer}.safetensors"))
    listed = "".join(
        f"  - hf://example/gpt2-fixture-transcoders/layer_{l}.safetensors\n"
        for l in range(c.n_layer)
    )
    (set_dir / "config.yaml").write_text(
        "model_kind: transcoder_set\n"
        "model_name: gpt2-fixture\n"
        'feature_input_hook: "ln2.hook_normalized"\n'
        'feature_output_hook: "hook_mlp_out"\n'
        f"transcoders:\n{listed}"
    )

    tensors = {}
    summary = []
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([c.bos_token_id] + tokenizer.encode(prompt), dtype=torch.long)
        graph = attribute(ids, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=64)
        tensors[f"{i}.input_ids"] = ids
        tensors[f"{i}.active_features"] = graph.active_features[graph.selected_features].long()
        tensors[f"{i}.activation_values"] = graph.activation_values[graph.selected_features].float()
        tensors[f"{i}.logit_tokens"] = torch.tensor(
            [t.vocab_idx for t in graph.logit_targets], dtype=torch.long
        )
        tensors[f"{i}.logit_probabilities"] = graph.logit_probabilities.float()
        tensors[f"{i}.adjacency"] = graph.adjacency_matrix.float().contiguous()
        # Pruning at circuit-tracer's defaults, and the graph's scores.
        node_mask, edge_mask, cumulative = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
        tensors[f"{i}.node_mask"] = node_mask.to(torch.uint8)
        tensors[f"{i}.edge_mask"] = edge_mask.to(torch.uint8)
        tensors[f"{i}.cumulative_scores"] = cumulative.float()
        tensors[f"{i}.scores"] = torch.tensor(compute_graph_scores(graph), dtype=torch.float32)
        summary.append(
            {
                "prompt": prompt,
                "tokens": len(ids),
                "active_features": int(len(graph.selected_features)),
                "nodes": int(graph.adjacency_matrix.shape[0]),
            }
        )
    # The first prompt again with at most LIMITED_FEATURES feature nodes: circuit-tracer ranks
    # the features by their influence on the logits through the rows found so far and
    # attributes the most influential first (LIMITED_BATCH rows a pass, its default
    # update_interval of 4 passes between rankings), keeping only those as nodes.
    ids = torch.tensor([c.bos_token_id] + tokenizer.encode(PROMPTS[0]), dtype=torch.long)
    graph = attribute(
        ids,
        model,
        max_n_logits=10,
        desired_logit_prob=0.95,
        batch_size=LIMITED_BATCH,
        max_feature_nodes=LIMITED_FEATURES,
    )
    tensors["limited.input_ids"] = ids
    tensors["limited.active_features"] = graph.active_features.long()
    tensors["limited.selected_features"] = graph.selected_features.long()
    tensors["limited.adjacency"] = graph.adjacency_matrix.float().contiguous()
    summary.append(
        {
            "prompt": PROMPTS[0],
            "max_feature_nodes": LIMITED_FEATURES,
            "active_features": int(len(graph.active_features)),
            "nodes": int(graph.adjacency_matrix.shape[0]),
        }
    )
    # The first prompt through a cross-layer transcoder, saved by circuit-tracer and loaded
    # back by its `load_clt` (decoders read lazily from the files, as for a Hugging Face CLT).
    model, tokenizer, c = hooked_gpt2(args.model)
    clt = cross_layer_transcoder(model, ids, c.n_layer, c.n_embd, generator)
    clt_dir = out / "clt"
    clt.to_safetensors(str(clt_dir))
    (clt_dir / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\n"
        "model_name: gpt2-fixture\n"
        'feature_input_hook: "hook_resid_mid"\n'
        'feature_output_hook: "hook_mlp_out"\n'
    )
    loaded = load_clt(
        str(clt_dir),
        feature_input_hook="hook_resid_mid",
        feature_output_hook="hook_mlp_out",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    model._configure_replacement_model(loaded)
    graph = attribute(ids, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=64)
    tensors["clt.input_ids"] = ids.clone()
    tensors["clt.active_features"] = graph.active_features[graph.selected_features].long()
    tensors["clt.activation_values"] = graph.activation_values[graph.selected_features].float()
    tensors["clt.logit_tokens"] = torch.tensor(
        [t.vocab_idx for t in graph.logit_targets], dtype=torch.long
    )
    tensors["clt.logit_probabilities"] = graph.logit_probabilities.float()
    tensors["clt.adjacency"] = graph.adjacency_matrix.float().contiguous()
    summary.append(
        {
            "prompt": PROMPTS[0],
            "transcoder": "cross-layer",
            "active_features": int(len(graph.selected_features)),
            "by_layer": [int((graph.active_features[:, 0] == l).sum()) for l in range(c.n_layer)],
            "nodes": int(graph.adjacency_matrix.shape[0]),
        }
    )
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "graphs.safetensors")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
