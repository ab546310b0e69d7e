"""Time and memory of the TAID loss paths against torch's cross-entropy, as ratios.

Each (case, method) runs in a fresh subprocess: one forward+backward measures the peak extra
memory beyond the inputs (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), then
the minimum time of several forward+backward runs is taken.

Methods (all float32; N tokens, V vocabulary, H hidden size):
    ce       F.cross_entropy on [N, V] logits (the yardstick)
    eager    taid_loss(implementation="eager"): autograd through the whole batch
    chunked  taid_loss (default): chunked, analytic gradients
    linear   logits = hidden @ W.T by autograd, then the chunked loss (the unfused pipeline)
    fused    fused_linear_taid_loss: hidden states and W in, logits never materialised

Memory is reported in units of one N x V float32 buffer. For ``linear`` and ``fused`` the
gradient buffers of hidden and W (unavoidable) are subtracted and reported separately.

    python benchmarks/loss_memory.py                  # the full table (~10 min on 2 cores)
    python benchmarks/loss_memory.py --quick          # small cases only
    python benchmarks/loss_memory.py --step           # also a whole distillation step
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("ce", "eager", "chunked", "linear", "fused")


# ------------------------------------------------------------------------------------------
# Worker: one method on one case, in its own process
# ------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(method: str, n: int, v: int, h: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from taid import functional as TF

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device).mul_(scale)

    teacher = randn(n, v, scale=2.0)
    labels = torch.randint(0, v, (n,), device=device)
    if method in ("linear", "fused"):
        hidden = randn(n, h)
        weight = randn(v, h, scale=h**-0.5)
        leaves = [hidden, weight]
    else:
        logits = randn(n, v, scale=2.0)
        leaves = [logits]

    def step():
        for x in leaves:
            x.grad = None
            x.requires_grad_(True)
        if method == "ce":
            loss = F.cross_entropy(logits, labels)
        elif method == "eager":
            loss = TF.taid_loss(logits, teacher, t=0.5, implementation="eager")
        elif method == "chunked":
            loss = TF.taid_loss(logits, teacher, t=0.5)
        elif method == "linear":
            loss = TF.taid_loss(hidden @ weight.T, teacher, t=0.5)
        else:
            loss = TF.fused_linear_taid_loss(hidden, weight, teacher, t=0.5)
        loss.backward()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    gc.collect()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()
    sync()
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = max(peak - base, 0)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    grad_bytes = sum(x.numel() * 4 for x in leaves) if method in ("linear", "fused") else 0
    return {
        "time": min(times),
        "extra": extra,
        "grad_bytes": grad_bytes,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


# ------------------------------------------------------------------------------------------
# Whole distillation step on a tiny model
# ------------------------------------------------------------------------------------------
def step_benchmark(reps: int) -> list[tuple[str, float]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from taid import build_loss
    from taid.models import plain_linear_head

    torch.manual_seed(0)
    vocab, seq, batch = 49152, 256, 4

    def model(hidden, layers):
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=3 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=hidden // 64,
                num_key_value_heads=hidden // 64,
                max_position_embeddings=seq,
                tie_word_embeddings=True,
            )
        )

    teacher = model(384, 4).eval().requires_grad_(False)
    student = model(192, 2)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    rows = []
    for name, fused in [("sft", False), ("fkl", False), ("taid", False), ("taid", True)]:
        loss_fn = build_loss(name, **({"total_steps": 100} if name == "taid" else {}))

        def one_step():
            if name != "sft":
                with torch.no_grad():
                    t_logits = teacher(ids).logits
            else:
                t_logits = None
            if fused:
                hidden = student.model(ids).last_hidden_state
                weight, bias = plain_linear_head(student)
                out = loss_fn.compute_fused(hidden, weight, t_logits, labels, student_bias=bias)
            else:
                out = loss_fn.compute(student(ids).logits, t_logits, labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad()

        one_step()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            one_step()
            times.append(time.perf_counter() - t0)
        path = "fused" if fused else "logits"
        label = f"{name} ({path}{', teacher fwd' if name != 'sft' else ''})"
        rows.append((label, min(times)))
    return rows


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------
def run_case(method: str, n: int, v: int, h: int, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(v), str(h), str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--worker", nargs=5, metavar=("METHOD", "N", "V", "H", "REPS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--quick", action="store_true", help="N=1024, V=32000 only")
    parser.add_argument("--hidden", type=int, default=576, help="H of the fused cases")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per case (min taken)")
    parser.add_argument("--step", action="store_true", help="also time a whole step")
    parser.add_argument(
        "--skip-eager-above",
        type=float,
        default=6e8,
        help="skip eager when N*V exceeds this (memory)",
    )
    args = parser.parse_args()
    if args.worker:
        method, n, v, h, reps = args.worker
        print(json.dumps(worker(method, int(n), int(v), int(h), int(reps))))
        return

    cases = (
        [(1024, 32000)]
        if args.quick
        else [(n, v) for n in (1024, 4096) for v in (32000, 49152, 128256)]
    )
    header = (
        "| N | V | method | time (s) | time / CE | extra memory (x N*V fp32) | "
        "of which hidden+W grads |"
    )
    print(header)
    print("|" + "---|" * 7)
    device = None
    for n, v in cases:
        nv_bytes = n * v * 4
        res = {}
        for method in METHODS:
            if method == "eager" and n * v > args.skip_eager_above:
                res[method] = {"error": "skipped (memory)"}
                continue
            res[method] = run_case(method, n, v, args.hidden, args.reps)
            device = res[method].get("device", device)
        ce_time = res["ce"].get("time")
        for method in METHODS:
            r = res[method]
            if "error" in r:
                print(f"| {n} | {v} | {method} | - | - | {r['error']} | - |")
                continue
            ratio = f"{r['time'] / ce_time:.2f}" if ce_time else "-"
            grads = f"{r['grad_bytes'] / nv_bytes:.3f}" if r["grad_bytes"] else "-"
            print(
                f"| {n} | {v} | {method} | {r['time']:.3f} | {ratio} | "
                f"{r['extra'] / nv_bytes:.2f} | {grads} |",
                flush=True,
            )
    print(
        f"\ndevice: {device}; H = {args.hidden}; min of {args.reps} runs after one warm-up "
        f"(the warm-up measures memory)"
    )
    if args.step:
        rows = step_benchmark(args.reps)
        base = rows[0][1]
        print("\n| whole step (tiny Llama, V=49152, 4 x 256 tokens) | time (s) | / SFT |")
        print("|---|---|---|")
        for label, t in rows:
            print(f"| {label} | {t:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
