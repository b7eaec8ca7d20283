#!/usr/bin/env python3
"""TransformerLens reference for benches/patching.rs: the bundled world model (a local
Hugging Face GPT-2 folder) booted with TransformerBridge (TransformerLens 4; raw HF weights,
eager attention), "The capital of Japan is" against "The capital of France is", the
normalised logit difference of " Tokyo" and " Paris" (first tokens), and TransformerLens's
get_act_patch_resid_pre / _attn_out / _mlp_out / _attn_head_out_all_pos /
_attn_head_q_all_pos / _k_all_pos / _v_all_pos / _attn_head_pattern_all_pos /
_attn_head_out_by_pos / _q_by_pos / _k_by_pos / _v_by_pos / _attn_head_pattern_by_pos, timed
together; the by-position grids flattened per layer, head-major, as monoscope reports them
(best of --repeats runs, after one warm-up). Prints the grids and seconds as JSON."""

import json

import torch
import transformer_lens.patching as patching

from tl_run import best_of, boot, versions

SITES = {
    "resid_pre": patching.get_act_patch_resid_pre,
    "attn_out": patching.get_act_patch_attn_out,
    "mlp_out": patching.get_act_patch_mlp_out,
    "heads": patching.get_act_patch_attn_head_out_all_pos,
    "queries": patching.get_act_patch_attn_head_q_all_pos,
    "keys": patching.get_act_patch_attn_head_k_all_pos,
    "values": patching.get_act_patch_attn_head_v_all_pos,
    "patterns": patching.get_act_patch_attn_head_pattern_all_pos,
    # [layer, pos, head] → [layer, head·pos]
    "heads_by_pos": lambda *a: patching.get_act_patch_attn_head_out_by_pos(*a)
    .transpose(1, 2)
    .flatten(1),
    "queries_by_pos": lambda *a: patching.get_act_patch_attn_head_q_by_pos(*a)
    .transpose(1, 2)
    .flatten(1),
    "keys_by_pos": lambda *a: patching.get_act_patch_attn_head_k_by_pos(*a)
    .transpose(1, 2)
    .flatten(1),
    "values_by_pos": lambda *a: patching.get_act_patch_attn_head_v_by_pos(*a)
    .transpose(1, 2)
    .flatten(1),
    # [layer, head, dest_pos] → [layer, head·pos]
    "patterns_by_pos": lambda *a: patching.get_act_patch_attn_head_pattern_by_pos(*a).flatten(1),
}


def main():
    model, tok, repeats = boot()
    clean = torch.tensor([tok.encode("The capital of Japan is")])
    corrupted = torch.tensor([tok.encode("The capital of France is")])
    answer, wrong = tok.encode(" Tokyo")[0], tok.encode(" Paris")[0]

    def logit_diff(logits):
        return logits[0, -1, answer] - logits[0, -1, wrong]

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        clean_ld = logit_diff(clean_logits).item()
        corrupted_ld = logit_diff(model(corrupted)).item()

    def metric(logits):
        return (logit_diff(logits) - corrupted_ld) / (clean_ld - corrupted_ld)

    def run_all():
        return {name: f(model, corrupted, clean_cache, metric) for name, f in SITES.items()}

    seconds, grids = best_of(run_all, repeats)
    print(json.dumps({
        **versions(),
        "clean_logit_diff": clean_ld,
        "corrupted_logit_diff": corrupted_ld,
        "seconds": seconds,
        "grids": {name: g.tolist() for name, g in grids.items()},
    }))


if __name__ == "__main__":
    main()
