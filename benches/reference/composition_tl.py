#!/usr/bin/env python3
"""TransformerLens reference for monoscope's composition scores: the bundled world model (a
local Hugging Face GPT-2 folder) booted with TransformerBridge and put in compatibility mode
(TransformerLens 4's HookedTransformer numerics: fold_ln, center_writing_weights), then
all_composition_scores("Q" / "K" / "V"), timed together (best of --repeats runs after one
warm-up). Prints the three [layer, head, layer, head] tensors and seconds as JSON."""

import json

import torch

from tl_run import best_of, boot, versions


def main():
    model, _, repeats = boot()
    model.enable_compatibility_mode(disable_warnings=True)

    def run_all():
        with torch.no_grad():
            return {mode: model.all_composition_scores(mode) for mode in "QKV"}

    seconds, scores = best_of(run_all, repeats)
    print(json.dumps({
        **versions(),
        "seconds": seconds,
        "scores": {mode: s.tolist() for mode, s in scores.items()},
    }))


if __name__ == "__main__":
    main()
