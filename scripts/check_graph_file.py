#!/usr/bin/env python3
"""Validates a `monoscope attribute` graph file, and the `graph-metadata.json` index beside it,
with circuit-tracer's own schema (its pydantic models in `circuit_tracer.frontend.graph_models`,
which its viewer's files follow):
    python scripts/check_graph_file.py japan.json
Needs circuit-tracer (0.5.0; `pip install --no-deps circuit-tracer==0.5.0 pydantic` suffices
for this check)."""

import json
import sys
from pathlib import Path

from circuit_tracer.frontend.graph_models import Metadata, Model


def main():
    path = Path(sys.argv[1])
    model = Model.model_validate_json(path.read_text())
    index = json.loads((path.parent / "graph-metadata.json").read_text())
    entries = [Metadata.model_validate(g) for g in index["graphs"]]
    slugs = [e.slug for e in entries]
    if model.metadata.slug not in slugs:
        sys.exit(f"{path}: slug {model.metadata.slug!r} is not in graph-metadata.json ({slugs})")
    print(f"{path}: valid ({len(model.nodes)} nodes, {len(model.links)} links; index {slugs})")


if __name__ == "__main__":
    main()
