"""BlackVIP's claims, in miniature, on the CPU.

Memory: a black-box step needs forward passes only, so its peak memory stays well under a
white-box VP step, which keeps the target's activations for backpropagation (paper Fig. 1 / §4).
Each side is measured in a fresh subprocess by `scripts/bench_blackvip.py --memory-child`.
"""

import json
import os
import subprocess
import sys

from reprolab.utils.config import PROJECT_ROOT


def _peak_mb(which: str, batch: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed blocks go back to the OS
    out = subprocess.run(
        [sys.executable, "scripts/bench_blackvip.py", "--memory-child", which,
         "--batch", str(batch), "--threads", "1"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_over_base_mb"]


def test_blackvip_step_uses_far_less_memory_than_white_box_vp() -> None:
    batch = 64
    vp = _peak_mb("vp", batch)
    blackvip = _peak_mb("blackvip_sequential", batch)
    # Measured here (tiny_clip architecture, batch 64): VP ~70 MB, BlackVIP ~31 MB.
    assert vp > 1.8 * blackvip, (vp, blackvip)
