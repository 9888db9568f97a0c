"""bench/gpu/run.sh starts: its driver, dry-run on CPU (tiny shapes, the same code path as on the GPU).

The GPU check is one call of a device that most sessions are not lent, so this is what proves it
runs: the model and data preparation, the packed-vs-unpacked check, the four sftkit / TRL runs of
`bench/train_throughput.py` (full and LoRA, padding-free) with their MFU lines, the profile of
sftkit's step (`bench/profile_step.py`) and the loss-alone table of `bench/loss_memory.py`, all the way to summary.txt. Minutes on a busy 2-core machine: slow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu" / "run.sh"), "--dry-run", "--models", "tiny-qwen2",
                           "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=1800,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text()

    packed = re.search(r"tiny-qwen2 packed vs unpacked loss .*float32: .*relative difference ([0-9.e+-]+);", summary)
    assert packed, summary
    assert float(packed.group(1)) < 1e-5  # the same documents, packed or alone, give the same fp32 loss

    throughput = (out / "throughput-tiny-qwen2.txt").read_text()
    for name in ("sftkit padding-free", "TRL padding-free", "sftkit LoRA padding-free", "TRL LoRA padding-free"):
        assert re.search(rf"^{re.escape(name)}\s+4\s", throughput, re.MULTILINE), throughput  # 4 steps each
        assert re.search(rf"MFU {re.escape(name)}\s+[0-9.]+%", throughput), throughput
    assert re.search(r"^sftkit/TRL trained tokens/s ratio: [0-9.]+$", throughput, re.MULTILINE), throughput
    assert re.search(r"^sftkit CPU MFU: [0-9.]+%$", throughput, re.MULTILINE), throughput
    assert "sftkit LoRA padding-free / TRL LoRA padding-free" in throughput

    profile = (out / "profile.txt").read_text()
    assert re.search(r"tiny-qwen2, padding_free, cpu float32, 3 steps, \d+ input tokens", profile), profile
    shares = [float(m) for m in re.findall(r"^  .+\s+[0-9.]+ s\s+([0-9.]+)%$", profile, re.MULTILINE)]
    assert shares and abs(sum(shares) - 100) < 1, profile  # every operator's time is in one group
    assert "== where one sftkit step's time goes (tiny-qwen2) ==" in summary

    loss = (out / "loss_memory.txt").read_text()
    for method in ("sftkit", "trl", "plain"):
        row = re.search(rf"^\s+64\s+4096 {method}\s+(\d+)\s+(\d+)\s+(\d+)\s+[0-9.]+\s+([0-9.]+)\s+([0-9.e+-]+)", loss, re.MULTILINE)
        assert row, loss
        assert float(row.group(5)) < 1e-4  # the same loss and gradients as sftkit's
