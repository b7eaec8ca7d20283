#!/usr/bin/env python3
"""Reads `cargo build --message-format=json-render-diagnostics` on stdin (passing the rendered
diagnostics through to stderr) and prints the executable each KIND:NAME argument names, one per
line, in order: `bench:sae` is benches/sae.rs, `test:oracle` tests/oracle.rs, `bin:monoscope`
the binary. Exits non-zero when one was not built."""

import json
import sys

wanted = sys.argv[1:]
found = {}
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except json.JSONDecodeError:
        sys.stderr.write(line)
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
        target = msg["target"]
        for kind in target["kind"]:
            found[f"{kind}:{target['name']}"] = msg["executable"]
missing = [w for w in wanted if w not in found]
if missing:
    sys.exit(f"cargo built no executable for {', '.join(missing)}")
print("\n".join(found[w] for w in wanted))
