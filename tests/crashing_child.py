"""A stand-in runtime child for tests of mosaic_export.process.run_child.

    python -m tests.crashing_child MODE [--pid-file F] --json OUT

MODE: ``segv`` (killed by SIGSEGV, as llama.cpp's AMX path is on the affected machines),
``fail`` (exits 2 with one error line), ``ok`` (writes {"ok": true}), ``sleep`` (writes its pid
to --pid-file, then sleeps: to test that it dies with its parent).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    from mosaic_export.process import die_with_parent

    die_with_parent()
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("segv", "fail", "ok", "sleep"))
    p.add_argument("--pid-file", type=Path, default=None)
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args()
    if a.mode == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if a.mode == "fail":
        print("mosaic-export: error: the model file is broken", file=sys.stderr)
        return 2
    if a.mode == "sleep":
        a.pid_file.write_text(str(os.getpid()))
        time.sleep(60)
    a.json.write_text(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
