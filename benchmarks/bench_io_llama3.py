"""Modelled HBM traffic of one Llama-3-8B decoder layer + lm_head/loss on the H100 profile.

Nothing is run on a GPU and no 8B-sized tensor is allocated: the model (Llama-3-8B
shapes: hidden 4096, 32 heads / 8 KV heads, head dim 128, intermediate 14336, vocab
128256, one decoder layer, untied lm_head, bf16, `attn_implementation="eager"`) is
built on the *meta* device and captured by `einfuse.inspect` with the sequence length
marked dynamic. The numbers are the Report's own: `region.extra["io"]` (bytes moved by
the region's unfused nodes, by the fused op, and the lower bound) and the roofline
times of `einfuse.analysis` on the H100 profile, with the sympy expressions evaluated
at each sequence length. Static captures at the first and last lengths cross-check the
symbolic evaluation. If the symbolic capture fails (a pass that cannot take SymInt
shapes), the script says so and uses one static meta-device capture per length.

Modes: `train` (parameters require grad: the forward of a training step; outputs and
the activations saved for backward are compulsory writes; the fused loss computes its
gradients in the forward) and `infer` (no grad; the loss only).

    python benchmarks/bench_io_llama3.py                       # seq 2048 8192 32768, both modes
    python benchmarks/bench_io_llama3.py --seq 2048 --modes train
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, use_cache=False)
TARGET = 1.2   # non-matmul regions: modelled traffic <= 1.2 x compulsory


def capture(mode: str, seq: int, dynamic: bool, layers: int):
    """einfuse.inspect of the meta-device model: the Report."""
    import torch
    import transformers as tf

    import einfuse
    cfg = tf.LlamaConfig(**LLAMA3_8B, num_hidden_layers=layers)
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
        ids = torch.zeros(1, seq, dtype=torch.long)
        labels = torch.zeros(1, seq, dtype=torch.long)
    model.train(mode == "train")
    model.requires_grad_(mode == "train")
    if dynamic:
        torch._dynamo.mark_dynamic(ids, 1)
        torch._dynamo.mark_dynamic(labels, 1)
    torch._dynamo.reset()
    with torch.set_grad_enabled(mode == "train"):
        rep = einfuse.inspect(model, input_ids=ids, labels=labels)
    torch._dynamo.reset()
    return rep


def region_io_bytes(nodes: list, inside: set, fused, after_nodes: list) -> object:
    """The region's compulsory traffic read off the *unfused* graph: every value its nodes read
    from outside it, once (a storage once), every value it hands to nodes outside it (or to the
    graph's outputs), once, plus the activations the fused op keeps for backward that are neither
    (RMSNorm's rstd, attention's log-sum-exp, an output only autograd reads)."""
    import sympy
    reads: dict = {}
    for c in nodes:
        for src, t in zip(c.in_nodes, c.ins):
            if src not in inside:
                key = t.storage
                reads[key] = sympy.Max(reads.get(key, 0), t.distinct_bytes)
    made = {st for c in nodes for st in c.allocs}          # storages the region's nodes allocate
    writes: dict = {}
    for c in nodes:
        if any(u not in inside for u in c.users) or c.graph_output:
            for t in c.outs:
                if t.storage in made:
                    writes[t.storage] = sympy.Max(writes.get(t.storage, 0), t.nbytes)
    # kept for backward and not handed on: the op's internal results it saves, and its outputs that
    # only autograd reads (e.g. add_rms_norm's h after the last layer)
    read_later = {t.storage for c in after_nodes if c.name != fused.name and c.kind in ("compute", "output")
                  for t in c.ins}
    kept = sum(b for b, saved, _ in fused.hidden if saved)
    kept += sum(t.nbytes for t in {t.storage: t for t in fused.saved}.values()
                if t.storage in fused.allocs and t.storage not in read_later)
    return sympy.Add(*reads.values()) + sympy.Add(*writes.values()) + kept


def region_rows(rep, sizes: dict, profile: str = "H100") -> list[dict]:
    """One row per fused region (and the rest of the graph), evaluated at `sizes`."""
    import sympy

    from einfuse.analysis import io_model
    from einfuse.analysis.cost import node_time
    from einfuse.analysis.devices import get_profile

    p = get_profile(profile)
    M = p.smem_per_block
    before, after = rep.cost_before, rep.cost_after
    assert len(before.graphs) == 1 == len(after.graphs), "one captured graph expected"
    gb, ga = before.graphs[0], after.graphs[0]
    by_b = {c.name: c for c in gb.nodes}
    by_a = {c.name: c for c in ga.nodes}

    def num(e):
        return after.subs(e, **sizes)

    rows, covered_b, covered_a = [], set(), set()
    for r in rep.regions:
        if not r.fused or "io" not in r.extra:
            continue
        io = r.extra["io"]
        fused = by_a[io["fused_node"]]
        covered_b |= set(io.get("unfused_nodes", r.nodes))
        covered_a.add(fused.name)
        comp = num(io_model.node_compulsory(fused))
        replaced = io.get("unfused_nodes", r.nodes)
        row = {"region": r.id, "kind": r.kind, "op": fused.op, "matmul": bool(num(fused.matmul_flops)),
               "boundary": num(region_io_bytes([by_b[n] for n in replaced], set(replaced), fused, ga.nodes)),
               "unfused_bytes": num(io["unfused"]), "fused_bytes": num(io["fused"]), "compulsory": comp,
               "lower_bound": num(io["lower_bound"]),
               "t_unfused_us": 1e6 * num(sympy.Add(*[node_time(by_b[n], p) for n in io.get("unfused_nodes", r.nodes)])),
               "t_fused_us": 1e6 * num(node_time(fused, p))}
        row["fused_over_compulsory"] = row["fused_bytes"] / comp
        row["fused_over_boundary"] = row["fused_bytes"] / row["boundary"]
        row["unfused_over_compulsory"] = row["unfused_bytes"] / comp
        row["fused_over_bound"] = row["fused_bytes"] / row["lower_bound"]
        if fused.op == "attention":
            q, k, v = fused.ins[:3]
            bh = q.shape[0] * q.shape[1]
            d, dv, e = q.shape[-1], v.shape[-1], q.itemsize
            n2d2 = num(bh * e * e * q.shape[-2] * k.shape[-2] * d * dv * sympy.Rational(1, M))
            row["n2d2_over_m"] = n2d2
            row["fused_over_n2d2"] = row["fused_bytes"] / n2d2
            row["constant"] = 2 * (d + dv) * (e * d + 4 * dv) / (e * d * dv)   # io_model: K/V re-read per query tile
            row["mask_bytes"] = sum(num(t.nbytes) for t in fused.ins[3:4])
        rows.append(row)
    rest_b = [c for c in gb.nodes if c.kind == "compute" and c.name not in covered_b]
    rest_a = [c for c in ga.nodes if c.kind == "compute" and c.name not in covered_a]
    rows.append({"region": "rest of the graph", "kind": "other", "op": "", "matmul": True,
                 "unfused_bytes": num(sympy.Add(*[io_model.node_traffic(c, M) for c in rest_b])),
                 "fused_bytes": num(sympy.Add(*[io_model.node_traffic(c, M) for c in rest_a])),
                 "compulsory": num(sympy.Add(*[io_model.node_compulsory(c) for c in rest_a])),
                 "lower_bound": num(sympy.Add(*[io_model.node_lower_bound(c, M) for c in rest_a])),
                 "t_unfused_us": 1e6 * num(sympy.Add(*[node_time(c, p) for c in rest_b])),
                 "t_fused_us": 1e6 * num(sympy.Add(*[node_time(c, p) for c in rest_a]))})
    rows.append({"region": "whole graph", "kind": "total", "op": "", "matmul": True,
                 "unfused_bytes": num(before.bytes_moved_on(p)), "fused_bytes": num(after.bytes_moved_on(p)),
                 "compulsory": None, "lower_bound": num(after.lower_bound_on(p)),
                 "t_unfused_us": 1e6 * num(before.time_on(p)), "t_fused_us": 1e6 * num(after.time_on(p))})
    return rows


def _gb(x):
    return "-" if x is None else f"{x / 1e9:.3f}"


def markdown(mode: str, seqs: list[int], table: dict[int, list[dict]]) -> str:
    out = [f"### {'Training forward' if mode == 'train' else 'Inference'} (H100 profile, M = 227 KiB, bf16)", "",
           "Compulsory: the fused op's inputs read once and its outputs and saved activations written once. "
           "Boundary: the same read off the unfused graph (the values the replaced nodes read from outside, once; "
           "the values they hand on, once; plus what the fused op keeps for backward). Lower bound: compulsory "
           "(attention: the larger of it and N²d²/M).", "",
           "| seq | region | op | unfused GB | fused GB | compulsory GB | boundary GB | lower bound GB "
           "| fused / compulsory | fused / boundary | unfused / compulsory | fused / bound | t unfused (µs) | t fused (µs) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in seqs:
        for r in table[s]:
            ratio = (lambda k: f"{r[k]:.2f}" if r.get(k) is not None else "-")
            fb = f"{r['fused_bytes'] / r['lower_bound']:.2f}" if r.get("lower_bound") else "-"
            out.append(f"| {s} | {r['region']} | {r['op'] or '-'} | {_gb(r['unfused_bytes'])} | {_gb(r['fused_bytes'])} "
                       f"| {_gb(r['compulsory'])} | {_gb(r.get('boundary'))} | {_gb(r['lower_bound'])} "
                       f"| {ratio('fused_over_compulsory')} | {ratio('fused_over_boundary')} "
                       f"| {ratio('unfused_over_compulsory')} | {fb} | {r['t_unfused_us']:.1f} | {r['t_fused_us']:.1f} |")
    out += ["", "Attention against the Saha–Ye Ω(N²d²/M) bound (bytes e²·B·H·S·T·D·Dv/M):", "",
            "| seq | N²d²/M term GB | compulsory GB (of which mask) | fused GB | fused / N²d²/M | asymptotic constant |",
            "|---|---|---|---|---|---|"]
    for s in seqs:
        for r in table[s]:
            if "n2d2_over_m" in r:
                out.append(f"| {s} | {_gb(r['n2d2_over_m'])} | {_gb(r['compulsory'])} ({_gb(r['mask_bytes'])}) "
                           f"| {_gb(r['fused_bytes'])} | {r['fused_over_n2d2']:.2f} | {r['constant']:g} |")
    misses = []
    for s in seqs:
        for r in table[s]:
            if r["kind"] in ("other", "total"):
                continue
            for k in ("fused_over_compulsory", "fused_over_boundary"):
                if not r["matmul"] and r[k] > TARGET:
                    misses.append(f"seq {s}: {r['region']} {k.replace('_over_', '/')} {r[k]:.2f}")
    nm = sorted({r["region"] for s in seqs for r in table[s] if not r["matmul"] and r["kind"] not in ("other", "total")})
    out += ["", f"Non-matmul regions checked against the {TARGET}× target (fused / compulsory and fused / boundary): "
            f"{', '.join(nm) or 'none'} — "
            + ("all within." if not misses else "MISSED: " + "; ".join(misses))]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--example-seq", type=int, default=256, help="sequence length of the symbolic capture")
    ap.add_argument("--out", default="io_llama3_8b")
    a = ap.parse_args()
    from common import save

    results, md, checks = {}, [], []
    for mode in a.modes:
        t0 = time.perf_counter()
        try:
            rep = capture(mode, a.example_seq, dynamic=True, layers=a.layers)
            if "seq" not in rep.cost_after.symbols:
                raise RuntimeError(f"the sequence did not stay symbolic: {rep.cost_after.symbols}")
        except Exception as e:  # noqa: BLE001 - fall back to one static capture per length
            rep = None
            cause = getattr(e, "inner_exception", None) or e
            checks.append(f"{mode}: the symbolic-sequence capture failed ({type(cause).__name__}: "
                          f"{str(cause).strip()[:160]}); one static meta-device capture per length used")
            print(checks[-1], flush=True)
        if rep is not None:
            print(f"{mode}: captured (symbolic seq) in {time.perf_counter() - t0:.1f}s; fusions {rep.fusions}", flush=True)
            table = {s: region_rows(rep, {"seq": s}) for s in a.seq}
            # cross-check: static captures at the first and last lengths give the same numbers
            for n in dict.fromkeys((a.seq[0], a.seq[-1])):
                static = capture(mode, n, dynamic=False, layers=a.layers)
                for x, y in zip(table[n], region_rows(static, {})):
                    for k in ("unfused_bytes", "fused_bytes", "compulsory", "lower_bound", "t_fused_us"):
                        if x[k] is not None and abs(float(x[k]) - float(y[k])) > 1e-6 * max(1.0, abs(float(y[k]))):
                            raise SystemExit(f"{mode} seq {n} {x['region']} {k}: symbolic {x[k]} != static {y[k]}")
                checks.append(f"{mode}: symbolic evaluation at seq {n} equals a static capture there")
        else:
            table = {}
            for s in a.seq:
                rep = capture(mode, s, dynamic=False, layers=a.layers)
                table[s] = region_rows(rep, {})
                print(f"{mode}: seq {s} captured ({time.perf_counter() - t0:.1f}s); fusions {rep.fusions}", flush=True)
        results[mode] = {"fusions": rep.fusions, "pass_counts": {rid: {k: str(v) for k, v in c.items()}
                                                                 for rid, c in rep.pass_counts.items()},
                         "by_seq": {str(s): rows for s, rows in table.items()}}
        md.append(markdown(mode, a.seq, table))
        print(md[-1], flush=True)
    title = (f"Modelled HBM traffic, Llama-3-8B shapes ({a.layers} decoder layer + lm_head/loss), bf16, "
             f"eager attention, batch 1, H100 profile (modelled, no GPU run). Reproduce: "
             f"`python benchmarks/bench_io_llama3.py --seq {' '.join(map(str, a.seq))} --modes {' '.join(a.modes)}`.")
    text = title + "\n\n" + "\n\n".join(md) + "\n\n" + "; ".join(checks) + "."
    path = save(a.out, [{"mode": m, **r} for m, r in results.items()], text, vars(a))
    print(f"\nsaved {path}")
    print(json.dumps({"checks": checks}))


if __name__ == "__main__":
    main()
