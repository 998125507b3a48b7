"""Atlas MSA vs plain global attention of the same width and depth, on CPU, by input size.

For each input size (px at the model's mpp; tokens at stride 16) this times ONE forward pass of
the token mixer (the stem is the same for both and is left out) and records its peak memory,
each configuration in a fresh process so the peaks do not mix. It also measures this machine's
fp32 and bf16 matmul peak in the same run and reports the achieved GFLOP/s of every pass
(linear-layer FLOPs counted by torch's FlopCounterMode, attention FLOPs counted analytically,
because the fused CPU attention kernel is not counted by it).

    python benchmarks/backbone_scaling.py            # all sizes, global attention up to 4096 px
    python benchmarks/backbone_scaling.py --quick    # < 4 min; global at 4096 px estimated

Two configurations by default, both compared at the same width, depth and precision, each at
its best implementation (MSA: ``Atlas.forward_tokens`` with the fused SDPA kernel; global:
timm ViT blocks, also fused SDPA):

- ``atlas_tiny`` (dim 96, 3 blocks): the default model's backbone; the headline keys
  ``speedup_at_2048`` and ``msa_growth_1024_to_4096`` of the JSON line describe it;
- ``atlas_small`` (dim 384, 2 + 6 blocks, g = 4): a realistic width where global attention's
  O(N^2) dominates; its figures are under the key ``"atlas_small"`` (with ``--quick`` only 1024
  and 2048 px, so it has no 4096 px growth figure).

Threads default to 1: on a 2-core CPU shared with another job, 2 OpenMP threads wait for
each other whenever one core is taken, which distorts the comparison (the MSA side, with many
small kernels, suffers most).

The last line printed is one JSON object (speedup_at_2048, msa_growth_1024_to_4096, ...).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from typing import Any

SIZES = (512, 1024, 2048, 4096)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS, so the peak
    # read after the pass belongs to the pass, not to imports or model construction.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _matmul_peak(dtype_name: str, threads: int, n: int = 2048, reps: int = 6) -> float:
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    dt = time.perf_counter() - t0
    return 2 * n**3 * reps / dt / 1e9


def _msa_attention_flops(net: Any, h: int, w: int, batch: int) -> float:
    """Multiply-add FLOPs (x2) of every attention product of the MSA stages, from the layouts."""
    layouts, _ = net.layouts_for(h, w)
    c = net.cfg.dim
    total = 0.0
    first = 0
    for si, stage in enumerate(net.stages):
        lay = layouts[first:]
        n = len(lay)
        per_block = 0.0
        for s in range(n):
            nq = batch * lay[s].n_windows * lay[s].tokens_per_window
            nk = lay[s].tokens_per_window + sum(lay[t].tokens_per_window for t in range(s + 1, n))
            per_block += 4 * nq * nk * c  # QK^T and AV
        for s in range(1, n):
            nq = batch * lay[s].h * lay[s].w
            per_block += 4 * nq * lay[s - 1].tokens_per_window * c
        total += per_block * len(stage)
        if si < len(net.stages) - 1 and n > 1:
            first += 1
    return total


def _run_one(kind: str, px: int, cfg_name: str, threads: int, dtype_name: str, queue: Any) -> None:
    import torch
    from timm.models.vision_transformer import Block
    from torch.utils.flop_counter import FlopCounterMode

    from histolens.models.atlas import ATLAS_CONFIGS, Atlas

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ATLAS_CONFIGS[cfg_name]
    h = px // 16
    tokens = torch.randn(1, cfg.dim, h, h)
    if kind == "msa":
        net = Atlas(cfg).eval()

        def step() -> Any:
            return net.forward_tokens(tokens)
    else:
        blocks = torch.nn.Sequential(
            *[
                Block(cfg.dim, cfg.heads, cfg.mlp_ratio, qkv_bias=True)
                for _ in range(sum(cfg.depths))
            ]
        ).eval()
        seq = tokens.flatten(2).transpose(1, 2)

        def step() -> Any:
            return blocks(seq)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_name == "bfloat16")
    with torch.inference_mode(), autocast:
        # FLOPs of the linear layers (fused attention is invisible to the counter).
        small = torch.randn(1, cfg.dim, 32, 32)
        step_small = (
            (lambda: net.forward_tokens(small))
            if kind == "msa"
            else (lambda: blocks(small.flatten(2).transpose(1, 2)))
        )
        step_small()  # warm-up: kernel selection, allocator
        with FlopCounterMode(display=False) as fc:
            step()
        linear_flops = float(fc.get_total_flops())
        if kind == "msa":
            attn_flops = _msa_attention_flops(net, h, h, 1)
        else:
            attn_flops = 4.0 * (h * h) ** 2 * cfg.dim * len(blocks)
        base = _status_mb("VmRSS")
        _reset_peak_rss()
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    flops = linear_flops + attn_flops
    queue.put(
        {
            "kind": kind,
            "px": px,
            "tokens": h * h,
            "seconds": dt,
            "peak_mb_over_base": peak - base,
            "gflop": flops / 1e9,
            "gflops_per_s": flops / dt / 1e9,
        }
    )


def _spawn(target: Any, *args: Any) -> Any:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    result = q.get()
    p.join()
    return result


def _peak_worker(dtype_name: str, threads: int, queue: Any) -> None:
    queue.put(_matmul_peak(dtype_name, threads))


def _ratio(a: dict, pa: int, b: dict, pb: int) -> float | None:
    return a[pa] / b[pb] if pa in a and pb in b else None


def run_config(
    config: str, sizes: tuple[int, ...], quick: bool, threads: int, dtype: str, peaks: dict
) -> dict:
    """Time MSA and global attention of ``config`` at ``sizes``; the summary dict."""
    rows: dict[tuple[str, int], dict] = {}
    for px in sizes:
        for kind in ("msa", "global"):
            if kind == "global" and quick and px == 4096:
                continue
            r = _spawn(_run_one, kind, px, config, threads, dtype)
            rows[(kind, px)] = r
            g = r["gflops_per_s"]
            print(
                f"{config:>11} {kind:>6} {px:>5} px {r['tokens']:>6} tokens  "
                f"{r['seconds']:8.3f} s  "
                f"peak +{r['peak_mb_over_base']:7.0f} MiB  {r['gflop']:8.1f} GFLOP  "
                f"{g:6.1f} GFLOP/s ({100 * g / peaks['float32']:4.1f}% of fp32 peak, "
                f"{100 * g / peaks['bfloat16']:4.1f}% of bf16)",
                flush=True,
            )
    msa = {px: rows[("msa", px)]["seconds"] for px in sizes}
    glob = {px: rows[("global", px)]["seconds"] for px in sizes if ("global", px) in rows}
    estimated = 4096 in sizes and 4096 not in glob and 2048 in glob
    if estimated:
        glob[4096] = glob[2048] * 16  # attention-dominated: N^2 with N x4
    return {
        "config": config,
        "speedup_at_2048": _ratio(glob, 2048, msa, 2048),
        "speedup_at_4096": _ratio(glob, 4096, msa, 4096),
        "speedup_at_4096_estimated": estimated,
        "msa_growth_1024_to_4096": _ratio(msa, 4096, msa, 1024),
        "msa_growth_1024_to_2048": _ratio(msa, 2048, msa, 1024),
        "global_growth_1024_to_2048": _ratio(glob, 2048, glob, 1024),
        "msa_seconds": msa,
        "global_seconds": glob,
        "msa_peak_mb": {px: rows[("msa", px)]["peak_mb_over_base"] for px in sizes},
        "global_peak_mb": {
            px: r["peak_mb_over_base"] for (k, px), r in rows.items() if k == "global"
        },
        "msa_gflops_per_s": {px: rows[("msa", px)]["gflops_per_s"] for px in sizes},
        "global_gflops_per_s": {
            px: r["gflops_per_s"] for (k, px), r in rows.items() if k == "global"
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="skip global attention at 4096 px (estimated x16 from 2048); atlas_small only at "
        "1024 and 2048 px",
    )
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["atlas_tiny", "atlas_small"],
        help="Atlas configs whose width/depth both sides use; the first is the headline",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="input sizes in px")
    args = ap.parse_args(argv)
    sizes = tuple(args.sizes)

    t_start = time.perf_counter()
    peaks = {d: _spawn(_peak_worker, d, args.threads) for d in ("float32", "bfloat16")}
    print(
        f"matmul peak ({args.threads} threads, 2048^3): fp32 {peaks['float32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bfloat16']:.0f} GFLOP/s",
        flush=True,
    )
    results = []
    for i, config in enumerate(args.configs):
        cfg_sizes = sizes
        if args.quick and i > 0:  # wider configs: the sizes that fit the 4-minute budget
            cfg_sizes = tuple(px for px in sizes if px in (1024, 2048)) or sizes
        results.append(run_config(config, cfg_sizes, args.quick, args.threads, args.dtype, peaks))
    summary = {
        "headline_config": args.configs[0],
        **results[0],
        "dtype": args.dtype,
        "threads": args.threads,
        **{r["config"]: r for r in results[1:]},
        "matmul_peak_gflops": peaks,
        "wall_seconds": time.perf_counter() - t_start,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
