"""Activation sparsity and layer skipping on a real model: SmolLM2-135M, perplexity vs decode speed.

The model: SmolLM2-135M-Instruct with its real weights (einfuse.models.smollm2), converted once from
the .gguf to a safetensors directory in the einfuse cache (shared with bench_quantize.py). Settings:
dense; "chess", "moc" and "coreinfer" at each --targets sparsity; layer skipping at each --skips
fraction. All run in one process, each through ``einfuse.optimize(model, passes=("layer_skip",
"sparsity"), ...)`` (``--passes all``: with the fusions too); the dense baseline goes through the same
passes with the options off (the same captured graph, run eagerly). CoreInfer keeps per-layer state
keyed by the weights, so each CoreInfer setting gets its own copy of the model.

Perplexity: the same fixed text as the quantization benchmark (bench_quantize.py) — the first
--windows x --window-len tokens of --text, as non-overlapping windows. In each window the first
--prompt tokens are the prompt (prefill with the KV cache, dense for CoreInfer by design) and the rest
are scored as a continuation (one teacher-forced forward over the cache; for CoreInfer inside
``sparse_mlp.continuation()``, so the continuation uses the prompt's core channels exactly as decoding
it token by token would). CHESS is calibrated (``einfuse.calibrate``, progress bar) on the
--calib-batches windows that follow that slice (a different part of the text).

Decode speed: batch 1, greedy, after a --decode-prompt-token prompt taken after the calibration
tokens. Interleaved at the finest grain: every setting has its own KV cache and the settings take turns
one decode step at a time, so machine noise falls on all of them alike; --rounds rounds (fresh prefill
each), --steps timed steps per round after --warmup untimed ones (the decode graphs compile there).
Reported: the median step time, as wall time and as the thread's CPU time (``time.thread_time``; with
one torch thread all the work runs on it, and CPU time does not count the time the process waits for
a core on a shared machine). The ceiling beside each speed is the bytes model of batch-1 decoding:
every step reads each weight it multiplies once, so skipping B of the W bytes gives at most
W / (W - B): CHESS/MoC skip the kept-out fraction (measured while decoding) of the up and down
projections, CoreInfer that of gate, up and down, layer skipping the q/o/MLP weights of the skipped
layers (their K/V projections still run, to keep the KV cache valid). "gain realised" =
(speedup - 1) / (ceiling - 1); the issue's target is >= 80% at 50% sparsity, within +10% perplexity.

    python benchmarks/bench_sparsity.py                    # the full table (~17 min on the 2 shared cores)
    python benchmarks/bench_sparsity.py --targets 0.5 --skips 0.2 --windows 2 --steps 4 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("chess", "moc", "coreinfer")
PASSES = ("layer_skip", "sparsity")


def cache_dir() -> Path:
    from common import smollm2_fp32_dir
    return smollm2_fp32_dir()


def prepare(a) -> dict:
    """Convert the .gguf once (same directory as bench_quantize.py); tokenize the text once."""
    from safetensors.torch import save_file
    from common import ensure_smollm2_fp32
    d = ensure_smollm2_fp32()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok(Path(a.text).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    n = a.windows * a.window_len
    m = a.calib_batches * a.window_len
    need = n + m + a.decode_prompt
    if ids.numel() < need:
        raise SystemExit(f"{a.text}: {ids.numel()} tokens, need {need}")
    path = d.parent / "bench_sparsity_ids.safetensors"
    save_file({"ppl": ids[:n].view(a.windows, a.window_len).contiguous(),
               "calib": ids[n:n + m].view(a.calib_batches, a.window_len).contiguous(),
               "prompt": ids[n + m:n + m + a.decode_prompt].view(1, -1).contiguous()}, str(path))
    return {"ids": str(path), "tokens": int(ids.numel()), "cal": str(d.parent / "bench_sparsity_cal.safetensors")}


def _load_model(threads: int):
    import torch
    from transformers import AutoModelForCausalLM
    if threads:
        torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(str(cache_dir()), dtype=torch.float32).eval()


def decode_bytes(model, setting: dict, sparsity: float) -> tuple[int, int]:
    """(bytes of the weights one dense decode step multiplies, bytes the setting skips)."""
    from einfuse.passes.layer_skip import layers_to_skip
    cfg = model.config
    L = cfg.num_hidden_layers
    total, seen = 0, set()
    for name, p in model.named_parameters():
        if p.dim() == 2 and p.data_ptr() not in seen:  # the tied embedding counts once (as the lm_head)
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    lay = lambda part: sum(p.numel() * p.element_size() for n, p in model.named_parameters()  # noqa: E731
                           if n.startswith("model.layers.0.") and part in n and p.dim() == 2)
    gate, up, down = lay("gate_proj"), lay("up_proj"), lay("down_proj")
    q, o = lay("q_proj"), lay("o_proj")
    kind = setting["kind"]
    if kind == "dense":
        return total, 0
    if kind == "skip":
        n = len(layers_to_skip(L, setting["fraction"]))
        return total, int(n * (q + o + gate + up + down))
    per = (up + down) if setting["method"] in ("chess", "moc") else (gate + up + down)
    return total, int(L * per * sparsity)


def label(s: dict) -> str:
    if s["kind"] == "dense":
        return "dense"
    if s["kind"] == "skip":
        return f"layer skip {s['fraction']:.0%}"
    return f"{s['method']} {s['target']:.0%}"


def perplexity(run, ppl_ids, prompt_len: int, coreinfer: bool) -> tuple[float, int]:
    import torch
    from transformers import DynamicCache
    from einfuse.runtime.ops import sparse_mlp
    nll, count = 0.0, 0
    for w in ppl_ids.split(1):
        prompt, rest = w[:, :prompt_len], w[:, prompt_len:]
        cache = DynamicCache()
        first = run(input_ids=prompt, past_key_values=cache, use_cache=True).logits[:, -1:]
        if coreinfer:
            with sparse_mlp.continuation():
                logits = run(input_ids=rest[:, :-1], past_key_values=cache, use_cache=True).logits
        else:
            logits = run(input_ids=rest[:, :-1], past_key_values=cache, use_cache=True).logits
        lp = torch.log_softmax(torch.cat([first, logits], 1).float(), -1)
        nll -= lp.gather(-1, rest.unsqueeze(-1)).sum().item()
        count += rest.numel()
    return math.exp(nll / count), count


def run_all(a, info: dict) -> tuple[list[dict], dict]:
    import torch
    from safetensors.torch import load_file
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    import einfuse
    from einfuse.runtime.ops import sparse_mlp

    # every setting is another optimized view of the same forward: one Dynamo cache entry per graph each
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 1 << 16
    ids = load_file(info["ids"])
    model = _load_model(a.threads)
    meta: dict = {"threads": torch.get_num_threads()}
    cal = None
    if any(m == "chess" for m in a.methods) and a.targets:
        t0 = time.perf_counter()
        cal = einfuse.calibrate(model, list(ids["calib"].split(1)), sparsity={"method": "chess", "target": 0.5})
        cal.save(info["cal"])
        meta["calibrate_s"] = time.perf_counter() - t0
        meta["calibration_tokens"] = int(ids["calib"].numel())
    settings = [{"kind": "dense"}]
    for t in a.targets:
        settings += [{"kind": "sparse", "method": m, "target": t} for m in a.methods]
    settings += [{"kind": "skip", "fraction": f} for f in a.skips]
    passes = None if a.passes == ["all"] else tuple(a.passes)
    runs = []
    for s in settings:
        opts: dict = {"passes": passes}
        m = model
        if s["kind"] == "skip":
            opts["layer_skip"] = s["fraction"]
        elif s["kind"] == "sparse":
            opts["sparsity"] = {"method": s["method"], "target": s["target"]}
            if s["method"] == "chess":
                opts["calibration"] = cal
            if s["method"] == "coreinfer":  # its runtime state is keyed by the weights: own copy
                m = copy.deepcopy(model)
        runs.append((m, einfuse.optimize(m, **opts)))
    rows = [dict(s) for s in settings]
    with torch.no_grad():
        for s, row, (m, run) in zip(tqdm(settings, desc="perplexity", unit="setting"), rows, runs):
            t0 = time.perf_counter()
            row["ppl"], row["ppl_tokens"] = perplexity(run, ids["ppl"], a.prompt, s.get("method") == "coreinfer")
            row["ppl_s"] = time.perf_counter() - t0
        prompt = ids["prompt"]
        wall = [[] for _ in settings]
        cpu = [[] for _ in settings]
        kept = [[0, 0] for _ in settings]
        bar = tqdm(total=a.rounds * (a.warmup + a.steps) * len(settings), desc="decode (interleaved)", unit="step")
        for r in range(a.rounds):
            state = []
            for _, run in runs:  # prefill every setting (CoreInfer picks its core channels here)
                cache = DynamicCache()
                out = run(input_ids=prompt, past_key_values=cache, use_cache=True)
                state.append([cache, out.logits[:, -1:].argmax(-1)])
            for step in range(a.warmup + a.steps):
                for i, (_, run) in enumerate(runs):
                    cache, tok = state[i]
                    with sparse_mlp.measuring() as ms:
                        c0, t0 = time.thread_time(), time.perf_counter()
                        out = run(input_ids=tok, past_key_values=cache, use_cache=True)
                        nxt = out.logits[:, -1:].argmax(-1)
                        t1, c1 = time.perf_counter(), time.thread_time()
                    state[i][1] = nxt
                    if step >= a.warmup:
                        wall[i].append(t1 - t0)
                        cpu[i].append(c1 - c0)
                        kept[i][0] += ms.kept
                        kept[i][1] += ms.total
                    bar.update()
        bar.close()
    for i, (s, row, (m, run)) in enumerate(zip(settings, rows, runs)):
        row["step_ms_wall"] = 1000 * statistics.median(wall[i])
        row["step_ms_cpu"] = 1000 * statistics.median(cpu[i])
        row["tok_s"] = 1000 / row["step_ms_wall"]
        row["tok_s_cpu"] = 1000 / row["step_ms_cpu"]
        row["steps"] = len(wall[i])
        row["decode_sparsity"] = 1 - kept[i][0] / kept[i][1] if kept[i][1] else 0.0
        rep = run.einfuse_report
        row["regions"] = {k: v for k, v in rep.fusions.items() if v}
        row["unfused"] = [r.summary() for r in rep.unfused][:3]
        total, skipped = decode_bytes(model, s, row["decode_sparsity"])
        row["decode_bytes"], row["skipped_bytes"] = total, skipped
        row["ceiling"] = total / (total - skipped)
    return rows, meta


def table(rows: list[dict]) -> str:
    base = rows[0]
    head = ["setting", "decode sparsity", "perplexity", "vs dense", "tok/s (wall)", "speedup (wall)",
            "tok/s (CPU time)", "speedup (CPU time)", "ceiling", "gain realised (wall / CPU)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sw = r["tok_s"] / base["tok_s"]
        sc = r["tok_s_cpu"] / base["tok_s_cpu"]
        ceil = r["ceiling"]
        gain = f"{(sw - 1) / (ceil - 1):.0%} / {(sc - 1) / (ceil - 1):.0%}" if ceil > 1.0001 else "-"
        sparsity = f"{r['decode_sparsity']:.1%}" if r["kind"] == "sparse" else "-"
        out.append(f"| {label(r)} | {sparsity} | {r['ppl']:.3f} | {100 * (r['ppl'] / base['ppl'] - 1):+.1f}% | "
                   f"{r['tok_s']:.2f} | {sw:.3f}x | {r['tok_s_cpu']:.2f} | {sc:.3f}x | {ceil:.3f}x | {gain} |")
    return "\n".join(out)


def verdict(rows: list[dict], target: float = 0.5) -> list[str]:
    """The issue's target at `target` sparsity, per method: within +10% perplexity and >= 80% of the gain."""
    base = rows[0]
    out = []
    for r in rows:
        if r["kind"] != "sparse" or abs(r["target"] - target) > 1e-9:
            continue
        dp = r["ppl"] / base["ppl"] - 1
        parts = []
        for what, key in (("wall", "tok_s"), ("CPU time", "tok_s_cpu")):
            sp = r[key] / base[key]
            g = (sp - 1) / (r["ceiling"] - 1)
            parts.append(f"{what}: speedup {sp:.3f}x of ceiling {r['ceiling']:.3f}x = {g:.0%} of the gain "
                         f"({'met' if g >= 0.8 else 'MISSED'})")
        out.append(f"- {label(r)}: perplexity {dp:+.1%} ({'met' if dp <= 0.10 else 'MISSED'}); " + "; ".join(parts))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base = rows[0]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"chess": ("o", "C0"), "moc": ("s", "C1"), "coreinfer": ("^", "C2"), "skip": ("D", "C3")}
    groups: dict = {}
    for r in rows[1:]:
        groups.setdefault(r.get("method", "skip"), []).append(r)
    for name, rs in groups.items():
        mk, col = styles[name]
        xs = [r["tok_s_cpu"] / base["tok_s_cpu"] for r in rs]
        ys = [r["ppl"] for r in rs]
        ax.plot(xs, ys, marker=mk, color=col, label="layer skip" if name == "skip" else name)
        for r, x, y in zip(rs, xs, ys):
            ax.annotate(f"{r['target']:.0%}" if name != "skip" else f"{r['fraction']:.0%}", (x, y),
                        textcoords="offset points", xytext=(4, 4), fontsize=8, color=col)
            ax.plot([r["ceiling"]], [y], marker=mk, color=col, alpha=0.3, linestyle="none")
    ax.plot([1.0], [base["ppl"]], marker="*", color="k", markersize=12, linestyle="none", label="dense")
    ax.axhline(base["ppl"] * 1.10, color="grey", linestyle=":", linewidth=1, label="dense +10% perplexity")
    ax.set_yscale("log")
    ax.set_xlabel("decode speedup vs dense (CPU time, batch 1); faint markers: bytes ceiling")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("SmolLM2-135M: activation sparsity and layer skipping (CPU)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--targets", nargs="*", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--skips", nargs="*", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64, help="unscored prompt tokens of each window")
    p.add_argument("--calib-batches", type=int, default=6)
    p.add_argument("--decode-prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per setting per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: CPU time is the whole work; 0: torch's default)")
    p.add_argument("--name", default="sparsity_smollm2")
    p.add_argument("--passes", nargs="*", default=list(PASSES),
                   help='einfuse passes for every setting ("all": the fusions too)')
    a = p.parse_args()

    import torch
    info = prepare(a)
    t0 = time.perf_counter()
    rows, meta = run_all(a, info)
    meta["total_s"] = time.perf_counter() - t0
    md = table(rows)
    lines = verdict(rows)
    title = (f"SmolLM2-135M-Instruct (real weights), CPU ({os.cpu_count()} cores shared with other jobs: load "
             f"average {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}, {meta['threads']} thread), "
             f"einfuse passes {a.passes}. Perplexity: tokens {a.prompt}..{a.window_len - 1} of each of the first "
             f"{a.windows} windows x {a.window_len} tokens of {Path(a.text).name} ({rows[0]['ppl_tokens']} tokens "
             f"scored, the same for every setting; the first {a.prompt} of each window are the prompt); CHESS "
             f"calibrated on the next {a.calib_batches} x {a.window_len} tokens. Decode: batch 1, greedy, after a "
             f"{a.decode_prompt}-token prompt; settings interleaved step by step; median of {rows[0]['steps']} steps "
             f"({a.rounds} rounds x {a.steps}). Ceiling: bytes of weights read per step, dense / (dense - skipped).")
    text = f"{title}\n\n{md}\n\nTarget at 50% sparsity (+10% perplexity, >= 80% of the ceiling's gain):\n" + \
        "\n".join(lines) + "\n"
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps({"meta": {**vars(a), **info, **meta}, "rows": rows}, indent=2))
    (RESULTS / f"{a.name}.md").write_text(text)
    plot(rows, RESULTS / f"{a.name}.png")
    print(f"saved {RESULTS / a.name}.md, .json and .png")


if __name__ == "__main__":
    main()
