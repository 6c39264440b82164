"""Run every benchmark in turn with its defaults and print their figures (`make bench`).

The export benchmark needs the SmolLM2 GGUF (fetched by `export.reference_model`) and takes
several minutes; the server benchmark takes seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("bench_server.py", "bench_calibration.py", "bench_export.py")


def main() -> int:
    failed = []
    for script in SCRIPTS:
        print(f"\n=== {script} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / script)], check=False).returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
