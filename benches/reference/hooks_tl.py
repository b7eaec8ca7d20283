#!/usr/bin/env python3
"""TransformerLens reference for benches/compare_hooks.sh: runs the model (a local Hugging Face
folder booted with TransformerBridge) on the `input_ids` of a `monoscope trace` file with
run_with_cache, and compares every hook monoscope saved with TransformerLens's value under the
same name. TransformerLens keeps heads on their own axis (`[batch, pos, head, d_head]`);
monoscope puts them side by side, so TransformerLens's value is reshaped before comparing
(`attn.hook_q_normed` / `hook_k_normed` of per-head norms come as `[batch, head, pos, d_head]`
and are transposed first).
Prints JSON: for each hook, the largest absolute difference divided by the largest absolute
value (attention scores of keys that both sides hide are left out; the sides must hide the
same ones);
monoscope's hooks TransformerLens has no value for; TransformerLens's hooks of the standard
names (not the bridge's own `.hook_in` / `.hook_out` wrappers) that monoscope lacks."""

import argparse
import json
import sys

import torch
from safetensors.torch import load_file
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerFast


def hidden(x):
    """Attention scores of keys the mask hides: -inf in monoscope (and classic
    TransformerLens), float32's lowest value in the bridge (transformers' mask)."""
    return torch.isinf(x) | (x <= torch.finfo(torch.float32).min / 2)


def relative_difference(ours, theirs):
    """max |ours - theirs| / max |theirs| over entries neither side hides; None if the
    sides hide different entries."""
    ours, theirs = ours.double(), theirs.double()
    masked = hidden(theirs)
    if not torch.equal(masked, hidden(ours)):
        return None
    ours, theirs = ours[~masked], theirs[~masked]
    scale = theirs.abs().max().item() or 1.0
    return (ours - theirs).abs().max().item() / scale


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True, help="a `monoscope trace --hooks '*'` file")
    args = ap.parse_args()
    ours = load_file(args.trace)
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{args.model}/tokenizer.json")
    model = TransformerBridge.boot_transformers(args.model, tokenizer=tok, device="cpu")
    model.cfg.dtype = torch.float32
    ids = ours.pop("input_ids").long()
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
    report = {"logits": relative_difference(ours.pop("logits"), logits)}
    missing_in_theirs = []
    for name, value in ours.items():
        if name not in cache:
            missing_in_theirs.append(name)
            continue
        theirs = cache[name]
        if name.endswith(("hook_q_normed", "hook_k_normed")) and theirs.dim() == 4:
            # The bridge hooks Qwen3's and Gemma 3's per-head normed queries and keys after
            # transformers' transpose: [batch, head, pos, d_head] (OLMo 2 normalises the whole
            # projection before the heads are split: [batch, pos, heads·d_head] as ours).
            theirs = theirs.transpose(1, 2)
        theirs = theirs.reshape(value.shape)
        report[name] = relative_difference(value, theirs)
    standard = [
        k
        for k in cache.keys()
        if ".hook_in" not in k
        and ".hook_out" not in k
        and not k.endswith("hook_hidden_states")
        and k not in ("hook_unembed",)
    ]
    missing_in_ours = [k for k in standard if k not in ours]
    json.dump(
        {
            "differences": report,
            "monoscope_only": missing_in_theirs,
            "transformer_lens_only": missing_in_ours,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
