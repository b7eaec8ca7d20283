#!/usr/bin/env python3
"""Execute a notebook headless against an export, as a test.

    py=$(bash scripts/python-env.sh)
    "$py" tests/python/run_notebook.py notebooks/explore_export.ipynb EXPORT_DIR [--output FILE]

Runs every cell with nbclient in a kernel on this interpreter (whatever Jupyter kernel specs
are installed elsewhere), from the notebook's folder, with MONOSCOPE_EXPORT set to EXPORT_DIR
(made absolute) and MPLBACKEND=Agg, and a 300 s limit per cell. The notebook itself is never
modified: the executed copy goes to FILE, or to a fresh temporary folder. Exits 1 with the
failing cell's source and error when a cell fails.
"""

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from ipykernel.kernelspec import RESOURCES, get_kernel_dict
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

CELL_TIMEOUT_S = 300
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # IPython colours its tracebacks


class ThisInterpreterKernelSpecs(KernelSpecManager):
    """Resolves any kernel name to an IPython kernel on this interpreter (sys.executable), so
    the notebook runs in this environment and not in whatever a user- or system-wide
    `python3` kernel spec points at."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())


def execute(notebook: Path, export_dir: Path, output: Path) -> bool:
    """Run the notebook, write the executed copy to output; True when every cell succeeded."""
    nb = nbformat.read(notebook, as_version=4)
    os.environ["MONOSCOPE_EXPORT"] = str(export_dir)
    os.environ["MPLBACKEND"] = "Agg"  # the kernel inherits this process's environment
    started = time.monotonic()
    # The kernel talks over IPC sockets in a private folder rather than unencrypted local TCP.
    with tempfile.TemporaryDirectory(prefix="monoscope-kernel-") as sockets:
        km = AsyncKernelManager(
            kernel_name="python3",
            kernel_spec_manager=ThisInterpreterKernelSpecs(),
            transport="ipc",
            ip=str(Path(sockets) / "kernel"),
        )
        client = NotebookClient(
            nb,
            km=km,
            timeout=CELL_TIMEOUT_S,
            resources={"metadata": {"path": str(notebook.parent)}},  # the kernel's working folder
        )
        try:
            client.execute(cleanup_kc=True)  # shut the kernel down even though we made km
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
            print(
                f"FAIL {notebook}: a cell failed:\n{ANSI_ESCAPE.sub('', str(e))}", file=sys.stderr
            )
            return False
        finally:
            nbformat.write(nb, output)
            print(f"executed copy: {output}", file=sys.stderr)
    cells = sum(c.cell_type == "code" for c in nb.cells)
    print(
        f"{notebook}: {cells} code cells ran in {time.monotonic() - started:.1f} s on {export_dir}"
    )
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("export_dir", type=Path, help="the folder `monoscope export --out` wrote")
    parser.add_argument(
        "--output",
        type=Path,
        help="where to write the executed notebook (default: a new temporary folder)",
    )
    args = parser.parse_args()
    notebook = args.notebook.resolve()
    export_dir = args.export_dir.resolve()
    for path, kind in ((notebook, "file"), (export_dir, "folder")):
        if not (path.is_file() if kind == "file" else path.is_dir()):
            print(f"FAIL {path}: no such {kind}", file=sys.stderr)
            return 1
    output = args.output or Path(tempfile.mkdtemp(prefix="monoscope-nb-")) / notebook.name
    if output.resolve() == notebook:
        print(f"FAIL {notebook}: --output must not be the notebook itself", file=sys.stderr)
        return 1
    return 0 if execute(notebook, export_dir, output) else 1


if __name__ == "__main__":
    sys.exit(main())
