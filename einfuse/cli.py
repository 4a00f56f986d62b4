"""The `einfuse` command line: `einfuse demo`, `einfuse inspect TARGET`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time


def _builtin(name: str):
    import torch
    if name == "tiny-llama":
        from einfuse.models import TinyLlama
        torch.manual_seed(0)
        model = TinyLlama()
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        return model, (ids,), {"labels": ids}
    raise SystemExit(f"einfuse: unknown built-in target {name!r} (known: tiny-llama)")


def _load_target(target: str):
    if ":" not in target:
        return _builtin(target)
    mod, _, fn = target.partition(":")
    obj = getattr(importlib.import_module(mod), fn)
    return obj()


def _rel_err(out, ref) -> float:
    import torch
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def demo(args) -> int:
    import torch
    import einfuse
    from einfuse.models import TinyLlama
    from einfuse.runtime import counters

    torch.manual_seed(0)
    model = TinyLlama()
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    print(f"einfuse demo: a tiny Llama-style model ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{model.config.layers} layers), random weights, batch 2 x 32 tokens, fp32 on CPU\n")
    ref_model = TinyLlama().double()
    ref_model.load_state_dict(model.state_dict())

    t0 = time.perf_counter()
    fast = einfuse.optimize(model)
    with counters.counting() as calls:
        loss = fast(ids, labels=ids)
        loss.backward()
    t1 = time.perf_counter()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager_loss = model(ids, labels=ids)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_loss = ref_model(ids, labels=ids)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}

    report = fast.einfuse_report
    print(f"captured {report.graphs} graph(s) and ran the pass pipeline in {t1 - t0:.1f} s (includes compile)")
    print("fusions:", ", ".join(f"{k}={v}" for k, v in report.fusions.items()))
    print("fused-op calls in one training step:", dict(calls) or "none")
    for r in report.unfused:
        print("not fused:", r.summary())
    ok = True
    rows = [("loss", _rel_err(loss, ref_loss), _rel_err(eager_loss, ref_loss))]
    for n in ref_grads:
        rows.append((f"grad {n}", _rel_err(grads[n], ref_grads[n]), _rel_err(eager_grads[n], ref_grads[n])))
    print("\nerror vs an fp64 reference: einfuse vs eager fp32 (rule: einfuse <= eager + 1e-5)")
    worst = max(rows, key=lambda r: r[1] - r[2])
    for name, e_fused, e_eager in rows[:4] + [worst]:
        print(f"  {name:<40} {e_fused:.2e}  {e_eager:.2e}")
    ok = all(e_fused <= e_eager + 1e-5 for _, e_fused, e_eager in rows)
    if not any(calls.values()):
        ok = False
        print("no fused op ran")
    print(f"\n{'OK' if ok else 'MISMATCH'}: optimized outputs and all {len(ref_grads)} gradients "
          f"{'match' if ok else 'do not match'} eager within the rule")
    return 0 if ok else 1


def inspect_cmd(args) -> int:
    import einfuse
    model, ex_args, ex_kwargs = _load_target(args.target)
    report = einfuse.inspect(model, *ex_args, **ex_kwargs)
    if args.format == "json":
        text = json.dumps({"fusions": report.fusions, "graphs": report.graphs,
                           "unfused": [{"id": r.id, "reason": r.reason} for r in report.unfused],
                           "regions": [{"id": r.id, "kind": r.kind, "fused": r.fused, "nodes": r.nodes}
                                       for r in report.regions]}, indent=2)
    else:
        text = report.to_markdown()
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="einfuse", description="Fusion passes for PyTorch models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="optimize a built-in tiny Llama, show what was fused, check against eager")
    ins = sub.add_parser("inspect", help="report what the passes do to a model")
    ins.add_argument("target", help="built-in name (tiny-llama) or package.module:callable returning (model, args, kwargs)")
    ins.add_argument("--format", choices=("md", "json"), default="md")
    ins.add_argument("-o", "--output")
    args = p.parse_args(argv)
    try:
        return {"demo": demo, "inspect": inspect_cmd}[args.cmd](args)
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"einfuse: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
