"""Peak memory and time of the loss alone (forward + backward of head + cross-entropy), large vocabularies.

    .venv/bin/python bench/loss_memory.py                          # 4k and 16k tokens x 152k and 262k vocab, hidden 1024
    .venv/bin/python bench/loss_memory.py --hidden 2048 --device cuda --dtype bfloat16
    .venv/bin/python bench/loss_memory.py --tokens 4096 --vocab 151936 --methods sftkit trl

Given the trained positions' hidden states `h` (tokens, hidden) and a head `W` (vocab, hidden), every
method computes sum_i cross_entropy(h_i @ W.T, t_i) and its gradients with respect to `h` and `W`
(`--frozen-head`: `h` only, as under LoRA):

  sftkit   `sftkit.loss.linear_cross_entropy`: chunks of rows, gradients made in the forward
  trl      TRL 1.16's loss (`loss_type="nll"`, of which `"chunked_nll"` is now an alias):
           `trl.kernels.ChunkedLogProbFunction`, 4,096-token x 32,768-vocab tiles, with the outputs
           `SFTTrainer` asks for (log-probs, entropy, top-1). It is given the trained rows only (what it
           does on CUDA; on CPU SFTTrainer scores every position, padding and prompts too)
  plain    `F.cross_entropy(h @ W.T)`: the full logits, what a model's own `loss=` does
  cce      Cut Cross-Entropy (`cut_cross_entropy.linear_cross_entropy`): its Triton kernel on CUDA, its
           `torch_compile` implementation elsewhere (the full logits, compiled)

Each case runs in its own process (`--child`), so no case sees another's memory. Memory on CPU is the
rise of the peak resident set over the resident set once the inputs exist (the peak is reset first
through /proc/self/clear_refs); on CUDA `torch.cuda.max_memory_allocated` over the allocation before
the call. `peak MB` includes the gradients the call hands back (a weight-sized one when the head
trains: every method must produce it); `work MB` is the peak minus those gradients: the memory the
loss itself needs. Time is one forward + backward after one warm-up call on a small slice (CPU: the
machine's load average is in the header). Gradients are checked against sftkit's: the loss, the
hidden gradient of the first 64 rows and the head gradient at their targets' rows (saved per child).
A case whose full logits would not fit in the free memory is skipped with the size it would need.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("sftkit", "trl", "plain", "cce")
CCE_PATH = os.environ.get("SFTKIT_BENCH_CCE_PATH")  # a pip --target folder holding cut-cross-entropy, if any


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def peak_resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def reset_peak() -> bool:
    """Reset this process's peak resident set to the current one (Linux clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def loss_function(method: str):
    import torch
    import torch.nn.functional as F

    if method == "sftkit":
        from sftkit.loss import CHUNK_ELEMENTS, linear_cross_entropy

        return lambda h, w, t: linear_cross_entropy(h, w, None, t, max(1, CHUNK_ELEMENTS // w.shape[0]))
    if method == "trl":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        def trl_loss(h, w, t):
            out = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                               ("log_probs", "entropy", "is_top1"))
            return -out[0].sum()
        return trl_loss
    if method == "plain":
        return lambda h, w, t: F.cross_entropy((h @ w.T).float(), t, reduction="sum")
    if method == "cce":
        if CCE_PATH:
            sys.path.insert(0, CCE_PATH)
        from cut_cross_entropy import linear_cross_entropy as cce

        impl = "cce" if torch.cuda.is_available() else "torch_compile"
        return lambda h, w, t: cce(h, w, t, impl=impl, reduction="sum")
    raise ValueError(method)


def child(method: str, tokens: int, vocab: int, hidden: int, dtype_name: str, device_name: str,
          frozen: bool, out: Path) -> dict:
    import torch

    dtype, device = getattr(torch, dtype_name), torch.device(device_name)
    try:
        function = loss_function(method)
    except Exception as err:  # noqa: BLE001 - the row says why the method could not run here
        return {"skipped": f"{type(err).__name__}: {err}"[:200]}
    logits_gb = tokens * vocab * 4 * 3 / 1e9  # fp32 logits, their softmax and its gradient
    if method in ("plain", "cce") and device.type == "cpu" and not torch.cuda.is_available():
        import psutil

        free = psutil.virtual_memory().available / 1e9
        if logits_gb > 0.5 * free:  # a shared machine: leave the others room
            return {"skipped": f"full logits need about {logits_gb:.0f} GB, over half the {free:.0f} GB free (shared machine)"}
    # drawn where they live: 262k x 2048 normal samples take seconds on a CPU before a GPU could use them
    generator = torch.Generator(device).manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=generator, device=device) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=generator, device=device) / hidden**0.5).to(dtype).requires_grad_(not frozen)
    t = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    function(h[:8].detach().requires_grad_(), w, t[:8]).backward()  # warm-up (compilation, kernels)
    w.grad = None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = resident_mb()
        reset_peak()
    start = time.perf_counter()
    loss = function(h, w, t)
    loss.backward()
    sync()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_resident_mb()) - before
    grads = sum(g.numel() * g.element_size() for g in (h.grad, w.grad) if g is not None) / 2**20
    rows = t[:64]
    torch.save({"loss": loss.detach().double().cpu(), "hidden": h.grad[:64].double().cpu(),
                "weight": None if w.grad is None else w.grad[rows].double().cpu()}, out)
    return {"peak_mb": peak, "grads_mb": grads, "work_mb": peak - grads, "seconds": seconds,
            "loss": float(loss) / tokens}


def compare(reference: Path, other: Path) -> float:
    """Largest relative difference of the loss and the saved gradient slices."""
    import torch

    a, b = torch.load(reference), torch.load(other)
    worst = 0.0
    for key in ("loss", "hidden", "weight"):
        if a[key] is None or b[key] is None:
            continue
        worst = max(worst, float((a[key] - b[key]).abs().max() / a[key].abs().max().clamp(min=1e-30)))
    return worst


def ratio(row: dict, trl: dict, key: str) -> str:
    return f"{row[key] / trl[key]:.3f}" if key in trl and trl[key] > 0 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="trained tokens")
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 262144], help="Qwen2.5 152k, Gemma 3 262k")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default="cuda" if os.path.exists("/dev/nvidia0") else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--frozen-head", action="store_true", help="no head gradient (LoRA)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # method tokens vocab result-file
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        method, tokens, vocab, out = args.child
        row = child(method, int(tokens), int(vocab), args.hidden, args.dtype, args.device, args.frozen_head, Path(out))
        print(json.dumps(row))
        return
    print(f"loss alone, forward + backward: hidden {args.hidden}, {args.dtype} on {args.device}, head "
          f"{'frozen' if args.frozen_head else 'trained'}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    head = (f"{'tokens':>6} {'vocab':>7} {'method':<7} {'peak MB':>8} {'work MB':>8} {'grads MB':>8} "
            f"{'seconds':>8} {'loss':>8} {'max rel diff':>12} {'peak/TRL':>8} {'work/TRL':>8}")
    print(head + "\n" + "-" * len(head), flush=True)  # each group's rows as soon as it is done: a cut run keeps them
    with tempfile.TemporaryDirectory(prefix="sftkit-loss-memory-") as tmp:
        for tokens in args.tokens:
            for vocab in args.vocab:
                rows = {}
                for method in args.methods:
                    out = Path(tmp) / f"{method}-{tokens}-{vocab}.pt"
                    command = [sys.executable, __file__, "--child", method, str(tokens), str(vocab), str(out),
                               "--hidden", str(args.hidden), "--device", args.device, "--dtype", args.dtype]
                    command += (["--frozen-head"] if args.frozen_head else []) + (
                        ["--threads", str(args.threads)] if args.threads else [])
                    done = subprocess.run(command, capture_output=True, text=True, check=False)
                    found = [line for line in done.stdout.splitlines() if line.startswith("{")]
                    rows[method] = json.loads(found[-1]) if found else {
                        "skipped": f"failed (exit {done.returncode}): {done.stderr.strip()[-200:]}"}
                    rows[method]["file"] = out
                trl, lines = rows.get("trl", {}), []
                reference = rows.get("sftkit", {}).get("file")
                for method, r in rows.items():
                    if "skipped" in r:
                        lines.append(f"{tokens:>6} {vocab:>7} {method:<7} {r['skipped']}")
                        continue
                    diff = compare(reference, r["file"]) if reference and reference.exists() and method != "sftkit" else 0.0
                    lines.append(f"{tokens:>6} {vocab:>7} {method:<7} {r['peak_mb']:>8.0f} {r['work_mb']:>8.0f} "
                                 f"{r['grads_mb']:>8.0f} {r['seconds']:>8.2f} {r['loss']:>8.4f} {diff:>12.1e} "
                                 f"{ratio(r, trl, 'peak_mb'):>8} {ratio(r, trl, 'work_mb'):>8}")
                print("\n".join(lines), flush=True)
    print("peak: rise over the inputs, gradients included; work: peak minus the gradients handed back; "
          "max rel diff: against sftkit (loss, 64 rows of each gradient)")


if __name__ == "__main__":
    main()
