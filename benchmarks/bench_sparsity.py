"""Activation sparsity and layer skipping on a real model: SmolLM2-135M, perplexity vs decode speed.

The model: SmolLM2-135M-Instruct with its real weights (einfuse.models.smollm2), converted once from
the .gguf to a safetensors directory in the einfuse cache (shared with bench_quantize.py), so every
worker loads in seconds. Settings: dense; "chess", "moc" and "coreinfer" at each --targets sparsity;
layer skipping at each --skips fraction. Each runs in its own process (fresh Dynamo caches, no shared
state) through ``einfuse.optimize(model, passes=("layer_skip", "sparsity"), ...)`` (``--passes all``: with
the fusions too) — the dense baseline through the same passes with the options off, i.e. the same
captured graph run eagerly.

Perplexity: the same fixed text as the quantization benchmark — the first --windows x --window-len
tokens of --text, as non-overlapping windows (the same for every setting). In each window the first
--prompt tokens are the prompt (prefill, with the KV cache) and the rest are scored as a continuation
(one teacher-forced forward over the cache; for CoreInfer inside ``sparse_mlp.continuation()``, so the
continuation uses the prompt's core channels exactly as decoding it token by token would). CHESS is
calibrated (``einfuse.calibrate``) on the --calib-batches windows that follow that slice.

Decode speed: batch 1, greedy, --new-tokens steps after a --decode-prompt-token prompt taken after the
calibration tokens; the time of the decode steps only (prefill excluded), median of --repeats runs
after a warm-up, over --rounds interleaved rounds (round r runs every setting once; perplexity in
round 0 only). The ceiling beside each speed is the bytes model of batch-1 decoding: every step reads
each weight it multiplies once, so skipping B of the W bytes can give at most W / (W - B): CHESS/MoC
skip the kept-out fraction (measured while decoding) of the up and down projections, CoreInfer that of
gate, up and down, layer skipping the q/o/MLP weights of the skipped layers (their K/V projections
still run, to keep the KV cache valid). "gain realised" = (speedup - 1) / (ceiling - 1).

    python benchmarks/bench_sparsity.py                    # the full table (~30-60 min on 2 busy cores)
    python benchmarks/bench_sparsity.py --targets 0.5 --skips 0.2 --windows 4 --rounds 1   # quick
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("chess", "moc", "coreinfer")
PASSES = ("layer_skip", "sparsity")


def cache_dir() -> Path:
    from einfuse.models.smollm2 import cache_dir as models_dir
    return models_dir() / "smollm2-135m-fp32"


def prepare(a) -> dict:
    """Convert the .gguf once (same directory as bench_quantize.py); tokenize the text once."""
    import torch
    from safetensors.torch import save_file
    d = cache_dir()
    if not (d / "config.json").exists():
        from einfuse.models.smollm2 import load_smollm2
        print("converting SmolLM2-135M from .gguf (once; 1-2 min) ...", flush=True)
        model, tok = load_smollm2()
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.save_pretrained(d)
        tok.save_pretrained(d)
        del model
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


def calibrate_worker(a) -> dict:
    import einfuse
    from safetensors.torch import load_file
    model = _load_model(a.threads)
    calib = load_file(a.ids)["calib"]
    t0 = time.perf_counter()
    cal = einfuse.calibrate(model, list(calib.split(1)), sparsity={"method": "chess", "target": 0.5})
    cal.save(a.cal)
    return {"calibrate_s": time.perf_counter() - t0, "mlps": len(cal), "tokens": int(calib.numel())}


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


def worker(a) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import DynamicCache

    import einfuse
    from einfuse.runtime import counters
    from einfuse.runtime.ops import sparse_mlp

    setting = json.loads(a.worker)
    ids = load_file(a.ids)
    t0 = time.perf_counter()
    model = _load_model(a.threads)
    row = {**setting, "round": a.round, "threads": torch.get_num_threads(), "load_s": time.perf_counter() - t0}
    opts: dict = {"passes": None if a.passes == ["all"] else tuple(a.passes)}
    if setting["kind"] == "skip":
        opts["layer_skip"] = setting["fraction"]
    elif setting["kind"] == "sparse":
        opts["sparsity"] = {"method": setting["method"], "target": setting["target"]}
        if setting["method"] == "chess":
            opts["calibration"] = einfuse.calibrate.load(a.cal)
    run = einfuse.optimize(model, **opts)
    cont = sparse_mlp.continuation if setting.get("method") == "coreinfer" else None

    with torch.no_grad():
        if a.round == 0:
            t0 = time.perf_counter()
            nll, count = 0.0, 0
            for w in ids["ppl"].split(1):
                prompt, rest = w[:, :a.prompt], w[:, a.prompt:]
                cache = DynamicCache()
                first = run(input_ids=prompt, past_key_values=cache, use_cache=True).logits[:, -1:]
                if cont is not None:
                    with cont():
                        logits = run(input_ids=rest[:, :-1], past_key_values=cache, use_cache=True).logits
                else:
                    logits = run(input_ids=rest[:, :-1], past_key_values=cache, use_cache=True).logits
                lp = torch.log_softmax(torch.cat([first, logits], 1).float(), -1)
                nll -= lp.gather(-1, rest.unsqueeze(-1)).sum().item()
                count += rest.numel()
            row["ppl"] = math.exp(nll / count)
            row["ppl_tokens"] = count
            row["ppl_s"] = time.perf_counter() - t0
        prompt = ids["prompt"]

        def decode(n):
            """Prefill the prompt, then n greedy decode steps: (step times, kept, total MLP channels)."""
            cache = DynamicCache()
            out = run(input_ids=prompt, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            times = []
            with sparse_mlp.measuring() as m:  # the decode steps only (CoreInfer's prefill is dense)
                for _ in range(n):
                    t = time.perf_counter()
                    out = run(input_ids=tok, past_key_values=cache, use_cache=True)
                    tok = out.logits[:, -1:].argmax(-1)
                    times.append(time.perf_counter() - t)
            return times, m.kept, m.total

        t0 = time.perf_counter()
        decode(4)  # warm-up: compiles the decode graphs (static, then dynamic cache length)
        row["warmup_s"] = time.perf_counter() - t0
        speeds, kept, total = [], 0, 0
        with counters.counting() as calls:
            for _ in range(a.repeats):
                times, k, n = decode(a.new_tokens)
                speeds.append(len(times) / sum(times))
                kept, total = kept + k, total + n
        row["tok_s_runs"] = speeds
        row["tok_s"] = statistics.median(speeds)
        row["decode_sparsity"] = 1 - kept / total if total else 0.0
        row["sparse_calls"] = calls.get("sparsity", 0)
    rep = run.einfuse_report
    row["regions"] = {k: v for k, v in rep.fusions.items() if v}
    row["unfused"] = [r.summary() for r in rep.unfused][:3]
    total, skipped = decode_bytes(model, setting, row["decode_sparsity"])
    row["decode_bytes"], row["skipped_bytes"] = total, skipped
    row["ceiling"] = total / (total - skipped)
    return row


def run_sub(args: list[str], timeout: int) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def label(s: dict) -> str:
    if s["kind"] == "dense":
        return "dense" + (" (again)" if s.get("again") else "")
    if s["kind"] == "skip":
        return f"layer skip {s['fraction']:.0%}"
    return f"{s['method']} {s['target']:.0%}"


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["kind"] == "dense" and "error" not in r), None)
    head = ["setting", "realised sparsity", "perplexity", "vs dense", "decode tok/s", "speedup", "ceiling",
            "gain realised"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"| {label(r)} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        sp = r["tok_s"] / base["tok_s"] if base else float("nan")
        ceil = r["ceiling"]
        gain = f"{(sp - 1) / (ceil - 1):.0%}" if ceil > 1.0001 else "-"
        dppl = f"{100 * (r['ppl'] / base['ppl'] - 1):+.1f}%" if base and "ppl" in r and "ppl" in base else "-"
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        sparsity = f"{r['decode_sparsity']:.1%}" if r["kind"] == "sparse" else "-"
        out.append(f"| {label(r)} | {sparsity} | {ppl} | {dppl} | {r['tok_s']:.2f} | {sp:.2f}x | {ceil:.2f}x | "
                   f"{gain} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--targets", nargs="*", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--skips", nargs="*", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--prompt", type=int, default=128, help="unscored prompt tokens of each window")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--decode-prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="interleaved speed rounds (perplexity in round 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (1: steadier on a shared machine; 0: torch's default)")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--name", default="sparsity_smollm2")
    p.add_argument("--passes", nargs="*", default=list(PASSES),
                   help='einfuse passes for every setting ("all": the fusions too)')
    p.add_argument("--worker")
    p.add_argument("--calibrate", action="store_true")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--ids")
    p.add_argument("--cal")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.calibrate:
        print(json.dumps(calibrate_worker(a)))
        return

    from tqdm.auto import tqdm
    info = prepare(a)
    common = ["--ids", info["ids"], "--cal", info["cal"], "--prompt", str(a.prompt), "--new-tokens",
              str(a.new_tokens), "--repeats", str(a.repeats), "--threads", str(a.threads), "--passes", *a.passes]
    settings = [{"kind": "dense"}]
    for t in a.targets:
        settings += [{"kind": "sparse", "method": m, "target": t} for m in a.methods]
    settings += [{"kind": "skip", "fraction": f} for f in a.skips]
    settings.append({"kind": "dense", "again": True})  # drift check: the machine is shared
    calib = {}
    if "chess" in a.methods:
        print("calibrating CHESS thresholds ...", flush=True)
        calib = run_sub(["--calibrate", *common], a.timeout)
        print("   ", calib, flush=True)
    runs: list[list[dict]] = [[] for _ in settings]
    bar = tqdm(total=a.rounds * len(settings), desc="einfuse bench_sparsity", unit="run")
    for r in range(a.rounds):
        for i, s in enumerate(settings):
            bar.set_postfix_str(f"round {r}: {label(s)}")
            row = run_sub(["--worker", json.dumps(s), "--round", str(r), *common], a.timeout)
            runs[i].append({**s, **row})
            bar.write(f"round {r} {label(s)}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                                              for k, v in row.items()
                                                              if k in ("ppl", "tok_s", "decode_sparsity",
                                                                       "ceiling", "error")}))
            bar.update()
    bar.close()
    rows = []
    for s, rs in zip(settings, runs):
        ok = [x for x in rs if "error" not in x]
        if not ok:
            rows.append(rs[0])
            continue
        first = next((x for x in ok if x.get("round") == 0), ok[0])
        speeds = [v for x in ok for v in x["tok_s_runs"]]
        rows.append({**first, "tok_s": statistics.median(speeds), "tok_s_runs": speeds})
    # the baseline speed: both dense runs (start and end) together
    dense = [r for r in rows if r["kind"] == "dense" and "error" not in r]
    if len(dense) == 2:
        both = dense[0]["tok_s_runs"] + dense[1]["tok_s_runs"]
        dense[0]["tok_s_first"] = dense[0]["tok_s"]
        dense[0]["tok_s"] = statistics.median(both)
    import torch
    md = table(rows)
    title = (f"SmolLM2-135M-Instruct (real weights), CPU ({os.cpu_count()} cores, shared with other jobs; torch "
             f"{torch.__version__}, {a.threads or 'default'} thread(s) per worker), einfuse passes {a.passes}. "
             f"Perplexity: the continuation tokens {a.prompt}..{a.window_len - 1} of {a.windows} windows x "
             f"{a.window_len} tokens of {Path(a.text).name} ({(a.window_len - a.prompt) * a.windows} tokens scored, "
             f"the same for every setting); CHESS calibrated on the next {a.calib_batches} windows. Decode: batch "
             f"1, {a.new_tokens} greedy steps after a {a.decode_prompt}-token prompt, median of {a.repeats} x "
             f"{a.rounds} interleaved runs (the dense speed: its runs at the start and the end together). "
             f"Ceiling: bytes of weights read per step, dense / (dense - skipped).")
    text = f"{title}\n\n{md}\n"
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps({"meta": {**vars(a), **info, "calibration": calib},
                                                        "rows": rows}, indent=2))
    (RESULTS / f"{a.name}.md").write_text(text)
    print(f"saved {RESULTS / a.name}.md and .json")


if __name__ == "__main__":
    main()
