"""Quantization on a real model: SmolLM2-135M, perplexity, decode speed and size per scheme.

The model: SmolLM2-135M-Instruct with its real weights (einfuse.models.smollm2; its
fp32 weights are dequantized from the Q4_1 .gguf, so group-32 asymmetric int4 would
be nearly lossless by construction: int4 and int6 are measured at group 64 and no
quality claim is made for group 32). The .gguf is converted once to a
save_pretrained directory in the einfuse cache, so each worker loads in seconds.

Schemes (`--schemes`): fp32, int8, int4_gptq, int4, int6, llm_int8, w8a8 (`X_gptq`: scheme X with
GPTQ rounding, act order, calibrated; `X+head`: the lm_head quantized too — SmolLM2's is tied
to the embedding, so it is untied and the fp embedding table stays, counted in the bytes; by
default the lm_head stays in fp; `llm_int8@T`: outlier threshold T instead of 6). Each
(scheme, inner) runs in a fresh process:
  * perplexity on a fixed slice of `--text` (default: ../shared/data/tinyshakespeare.txt):
    the first windows x window_len tokens, as non-overlapping windows (the same for every
    scheme), measured once per scheme (round 0, the first --inner); llm_int8 and GPTQ are
    calibrated on the calib_batches x window_len tokens that follow that slice (same
    text, disjoint tokens). A calibrated model is quantized once and saved with
    einfuse.quant.save_quantized; later workers load it with load_quantized.
  * decode speed: batch 1, `generate()` with the KV cache, greedy, --new-tokens new
    tokens after a 32-token prompt, through `einfuse.optimize(model, inner=...)` for each
    --inner ("none": the module as is), median of all repeats over all rounds (after a warm-up);
  * parameter bytes (distinct parameter and buffer storages), and the bytes of the
    weights one decode step multiplies (every linear and the lm_head);
  * the bandwidth ceiling: those bytes over a measured copy bandwidth (bytes read +
    written per second by a 256 MB tensor copy, measured in each worker), the tokens/s a
    memory-bound decoder could reach.
Speed rounds are interleaved (round r runs every (scheme, inner) once) to spread machine
noise evenly.

    python benchmarks/bench_quantize.py --inner eager inductor --threads 1      # the README table
    python benchmarks/bench_quantize.py --schemes fp32 int8 --inner none --new-tokens 16 --rounds 1 --windows 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = Path(__file__).resolve().parent.parent
SCHEMES = ["fp32", "int8", "int4_gptq", "int6", "llm_int8", "w8a8"]


def cache_dir() -> Path:
    from common import smollm2_fp32_dir
    return smollm2_fp32_dir()


def prepare(a) -> dict:
    """Convert the .gguf once; tokenize the text once (ids saved with safetensors)."""
    from safetensors.torch import save_file
    from common import ensure_smollm2_fp32
    d = ensure_smollm2_fp32()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(d))
    text = Path(a.text).read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt").input_ids[0]
    need = a.windows * a.window_len + a.calib_batches * a.window_len + 64
    if ids.numel() < need:
        raise SystemExit(f"{a.text}: {ids.numel()} tokens, need {need}")
    n = a.windows * a.window_len
    ppl = ids[:n].view(a.windows, a.window_len)
    calib = ids[n:n + a.calib_batches * a.window_len].view(a.calib_batches, a.window_len)
    prompt = ids[n + a.calib_batches * a.window_len:][:32].view(1, 32)
    path = d.parent / "bench_quantize_ids.safetensors"
    save_file({"ppl": ppl.contiguous(), "calib": calib.contiguous(), "prompt": prompt.contiguous()}, str(path))
    return {"ids": str(path), "tokens": int(ids.numel())}


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 256 MB copy (best of 5)."""
    import torch
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def decode_bytes(model) -> int:
    """Bytes of the weights one decode step multiplies: every linear (quantized or not)."""
    import torch.nn as nn
    from einfuse.quant.modules import QuantizedLinear
    total, seen = 0, set()
    for m in model.modules():
        ts = []
        if isinstance(m, nn.Linear):
            ts = [m.weight]
        elif isinstance(m, QuantizedLinear):
            ts = [t for t in (m.qweight, m.scales, m.offsets) if t is not None]
        for t in ts:
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def _quantized_path(scheme: str, a) -> Path:
    import hashlib
    h = hashlib.sha256(Path(a.ids).read_bytes()).hexdigest()[:12]
    return cache_dir().parent / f"bench_quantize_{scheme}_g{a.group_size}_{h}.safetensors"


def worker(scheme: str, a) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import einfuse
    from einfuse.passes.quantize import model_bytes
    from einfuse.quant import cpu_kernels

    if a.threads:
        torch.set_num_threads(a.threads)
    ids = load_file(a.ids)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(cache_dir()), dtype=torch.float32).eval()
    row = {"name": scheme, "inner": a.inner, "round": a.round, "threads": torch.get_num_threads(),
           "kernels": cpu_kernels.status(), "load_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    notes = []
    if scheme != "fp32":
        name, head = scheme.removesuffix("+head"), scheme.endswith("+head")
        name, _, thr = name.partition("@")  # llm_int8@4: outlier threshold 4 (default 6)
        base = name.removesuffix("_gptq")
        calibrated = base == "llm_int8" or name.endswith("_gptq")
        saved = _quantized_path(scheme, a)
        if calibrated and saved.exists():  # quantized (and calibrated) once; the safetensors round trip
            einfuse.quant.load_quantized(model, saved)
            notes = json.loads(einfuse.quant.read_metadata(saved).get("bench_notes", "[]"))
            row["loaded_quantized"] = True
        else:
            opts = {"group_size": a.group_size} if base in ("int4", "int6") else {}
            if thr:
                opts["threshold"] = float(thr)
            calib = list(ids["calib"].split(1)) if calibrated else None
            summary = einfuse.quant.quantize(model, base, calibration=calib, progress=True, lm_head=head, **opts)
            notes = summary.notes
            if calibrated:
                einfuse.quant.save_quantized(model, saved, metadata={"bench_notes": json.dumps(notes)})
    row["quantize_s"] = time.perf_counter() - t0
    row["param_bytes"] = model_bytes(model)
    row["decode_bytes"] = decode_bytes(model)
    row["notes"] = notes
    run = model if a.inner == "none" else einfuse.optimize(model, inner=a.inner)

    with torch.no_grad():
        if a.ppl:
            t0 = time.perf_counter()
            nll, count = 0.0, 0
            for batch in ids["ppl"].split(a.ppl_batch):
                logits = run(input_ids=batch).logits.float()
                lp = torch.log_softmax(logits[:, :-1], dim=-1)
                tgt = batch[:, 1:]
                nll -= lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
                count += tgt.numel()
            row["ppl"] = math.exp(nll / count)
            row["ppl_tokens"] = count
            row["ppl_s"] = time.perf_counter() - t0
        prompt = ids["prompt"]
        gen = dict(do_sample=False, use_cache=True, pad_token_id=0)
        t0 = time.perf_counter()
        run.generate(prompt, max_new_tokens=8, min_new_tokens=8, **gen)  # warm-up (compiles with --inner)
        run.generate(prompt, max_new_tokens=8, min_new_tokens=8, **gen)
        row["warmup_s"] = time.perf_counter() - t0
        speeds = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = run.generate(prompt, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **gen)
            dt = time.perf_counter() - t0
            speeds.append((out.shape[1] - prompt.shape[1]) / dt)
        row["tok_s_runs"] = speeds
        row["tok_s"] = statistics.median(speeds)
        if a.profile:  # where one decode's time goes (top ops by self CPU time)
            from torch.profiler import profile
            with profile() as prof:
                run.generate(prompt, max_new_tokens=16, min_new_tokens=16, **gen)
            ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in ev)
            row["profile_top"] = [(e.key, round(e.self_cpu_time_total / total, 3), e.count) for e in ev[:8]]
    bw = copy_bandwidth()
    row["copy_bw_gbs"] = bw / 1e9
    row["ceiling_tok_s"] = bw / row["decode_bytes"]
    return row


def run_worker(scheme: str, a, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", scheme, *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=a.timeout)
    if p.returncode != 0:
        return {"name": scheme, "error": f"exit {p.returncode}", "wall_s": time.perf_counter() - t0}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--schemes", nargs="*", default=SCHEMES)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--ppl-batch", type=int, default=4)
    p.add_argument("--calib-batches", type=int, default=16, help="calibration windows (llm_int8, *_gptq)")
    p.add_argument("--group-size", type=int, default=64, help="int4/int6 group size")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="interleaved speed rounds (perplexity in round 0)")
    p.add_argument("--inner", nargs="+", default=["eager", "inductor"], choices=("none", "eager", "inductor"),
                   help="none: the (quantized) module as is; eager/inductor: through einfuse.optimize")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also profile one decode per worker (top ops)")
    p.add_argument("--out", default="quantize_smollm2")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--worker")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--ppl", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-ppl", action="store_true", help="speed only (perplexity does not depend on --inner)")
    p.add_argument("--ids")
    a = p.parse_args()
    if a.worker:
        a.inner = a.inner[0]
        print(json.dumps(worker(a.worker, a)))
        return

    from common import save
    info = prepare(a)
    t_start = time.perf_counter()
    common_args = ["--ids", info["ids"], "--windows", str(a.windows), "--window-len", str(a.window_len),
                   "--ppl-batch", str(a.ppl_batch), "--group-size", str(a.group_size),
                   "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats), "--threads", str(a.threads)]
    if a.profile:
        common_args.append("--profile")
    runs: dict[tuple[str, str], list[dict]] = {(s, i): [] for s in a.schemes for i in a.inner}
    for r in range(a.rounds):
        for s in a.schemes:
            for i in a.inner:
                print(f"round {r}: {s} inner={i} ...", flush=True)
                ppl = ["--ppl"] if r == 0 and i == a.inner[0] and not a.no_ppl else []
                row = run_worker(s, a, common_args + ["--inner", i, "--round", str(r)] + ppl)
                print("   ", {k: v for k, v in row.items() if k not in ("notes",)}, flush=True)
                runs[(s, i)].append(row)
    rows = []
    for (s, i), rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append({**rs[0], "inner": i})
            continue
        first = next((r for r in ok if r.get("round") == 0), ok[0])
        all_speeds = [v for r in ok for v in r["tok_s_runs"]]
        ppl = next((r["ppl"] for (s2, _), rr in runs.items() if s2 == s for r in rr if "ppl" in r), None)
        rows.append({**first, "ppl": ppl, "tok_s": statistics.median(all_speeds), "tok_s_runs": all_speeds,
                     "ceiling_tok_s": statistics.median(r["ceiling_tok_s"] for r in ok),
                     "copy_bw_gbs": statistics.median(r["copy_bw_gbs"] for r in ok)})
    base_ppl = next((r["ppl"] for r in rows if r["name"] == "fp32" and r.get("ppl")), None)
    head = ["scheme", "inner", "perplexity", "vs fp32", "decode tok/s", "vs fp32", "ceiling tok/s (% reached)",
            "param MB", "vs fp32", "decode-weight MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['inner']} | error: {r['error']} |" + " |" * (len(head) - 3))
            continue
        base = next((b for b in rows if b["name"] == "fp32" and b["inner"] == r["inner"] and "error" not in b), None)
        rel = lambda k: f"{r[k] / base[k]:.2f}x" if base and base.get(k) else "-"  # noqa: E731
        ppl = f"{r['ppl']:.3f}" if r.get("ppl") else "-"
        dppl = f"{100 * (r['ppl'] / base_ppl - 1):+.2f}%" if base_ppl and r.get("ppl") else "-"
        lines.append(f"| {r['name']} | {r['inner']} | {ppl} | {dppl} | {r['tok_s']:.2f} | {rel('tok_s')} | "
                     f"{r['ceiling_tok_s']:.1f} ({100 * r['tok_s'] / r['ceiling_tok_s']:.0f}%) | "
                     f"{r['param_bytes'] / 1e6:.1f} | {rel('param_bytes')} | {r['decode_bytes'] / 1e6:.1f} |")
    md = "\n".join(lines)
    import torch
    load = os.getloadavg()
    ok_rows = [r for r in rows if "error" not in r]
    title = (f"SmolLM2-135M-Instruct (real weights), CPU ({os.cpu_count()} cores, torch {torch.__version__}, "
             f"{ok_rows[0].get('threads', '?') if ok_rows else '?'} threads, kernels: "
             f"{ok_rows[0].get('kernels', '?') if ok_rows else '?'}); machine shared with other jobs "
             f"(load average {load[0]:.1f} at the end), so speeds are noisy: compare within a column. "
             f"Perplexity: {a.windows} x {a.window_len} tokens of {Path(a.text).name} (calibration: the next "
             f"{a.calib_batches} x {a.window_len} tokens); decode: batch 1, {a.new_tokens} new tokens, "
             f"generate() with KV cache, median of {a.repeats} x {a.rounds} interleaved runs; "
             f"int4/int6 group {a.group_size}; wall time {time.perf_counter() - t_start:.0f} s.")
    notes = sorted({n for r in rows for n in r.get("notes", []) if "group size" not in n})
    text = f"{title}\n\n{md}\n" + ("\nNotes:\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
    print("\n" + text)
    path = save(a.out, rows, text, {**vars(a), **info})
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
