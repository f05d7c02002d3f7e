"""A stand-in runtime child for tests of mosaic_export.measure.process.run_child.

    python -m tests.crashing_child MODE [--pid-file F] [--mib N] --json OUT
    CRASHING_CHILD_MODE=MODE python -m tests.crashing_child ANY ARGUMENTS --json OUT

MODE: ``segv`` (killed by SIGSEGV, as llama.cpp's AMX path is on the affected machines),
``fail`` (exits 2 with one error line), ``ok`` (writes {"ok": true}), ``sleep`` (writes its pid
to --pid-file, then sleeps: to test that it dies with its parent), ``eat`` (holds --mib MiB of
touched memory for 10 s, then writes {"ok": true}: to test the memory limit). With
CRASHING_CHILD_MODE set, the child takes the arguments a real runner is given and ignores them
(a test points a runner's MODULE here).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

MODES = ("segv", "fail", "ok", "sleep", "eat")


def main() -> int:
    from mosaic_export.measure.process import die_with_parent

    die_with_parent()
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("--pid-file", type=Path, default=None)
    p.add_argument("--mib", type=int, default=0)
    p.add_argument("--json", type=Path, required=True)
    a, _ = p.parse_known_args()
    mode = os.environ.get("CRASHING_CHILD_MODE", a.mode)
    assert mode in MODES, mode
    if mode == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if mode == "fail":
        print("mosaic-export: error: the model file is broken", file=sys.stderr)
        return 2
    if mode == "sleep":
        a.pid_file.write_text(str(os.getpid()))
        time.sleep(60)
    if mode == "eat":
        held = bytearray(a.mib * 2**20)
        for i in range(0, len(held), 4096):  # touched: resident
            held[i] = 1
        time.sleep(10)
    a.json.write_text(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
