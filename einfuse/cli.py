"""The `einfuse` command line (also `python -m einfuse`).

    einfuse demo                                   optimize a built-in tiny Llama, check it against eager
    einfuse inspect tiny-llama --format html -o report.html
    einfuse inspect mypkg.models:make              make() returns (model, example_args, example_kwargs)
    einfuse inspect path/to/file.py:make
    einfuse inspect smollm2 --quantize int8 --format html -o smollm2.html
    einfuse passes                                 the pass pipeline, in order

Errors print one line (`einfuse: error: ...`) unless --debug is given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

BUILTINS = ("tiny-llama", "tiny-gpt2", "smollm2")


class CLIError(Exception):
    """An error the user can fix; printed as one line."""


# ------------------------------------------------------------------------------------------------
# progress: a spinner / bar on stderr (rich when installed and stderr is a terminal, plain lines otherwise)

class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._rich = None
        if enabled and sys.stderr.isatty():
            try:
                from rich.console import Console
                self._rich = Console(stderr=True)
            except ImportError:
                self._rich = None

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """A long step: a spinner while it runs, then its time."""
        t0 = time.perf_counter()
        if not self.enabled:
            yield
            return
        if self._rich is not None:
            with self._rich.status(f"{what} ..."):
                yield
            self._rich.print(f"[green]✓[/green] {what} ({time.perf_counter() - t0:.1f} s)")
        else:
            print(f"einfuse: {what} ...", file=sys.stderr, flush=True)
            yield
            print(f"einfuse: {what}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def bar(self, what: str, total: int) -> Iterator[Any]:
        """A counted step; the yielded callable advances it by one with a description."""
        if not self.enabled or total <= 0:
            yield lambda _msg="": None
            return
        if self._rich is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn
            with RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=self._rich, transient=True) as rp:
                task = rp.add_task(what, total=total)
                state = {"n": 0}

                def advance(msg: str = "") -> None:
                    if state["n"]:
                        rp.advance(task)
                    state["n"] += 1
                    rp.update(task, description=f"{what}: {msg}" if msg else what)
                yield advance
            self._rich.print(f"[green]✓[/green] {what}")
        else:
            state = {"n": 0}

            def advance(msg: str = "") -> None:
                state["n"] += 1
                print(f"einfuse: {what} [{state['n']}/{total}] {msg}", file=sys.stderr, flush=True)
            yield advance


# ------------------------------------------------------------------------------------------------
# targets

def _tiny_gpt2(batch: int, seq: int, layers: int):
    import torch
    try:
        import transformers as tf
    except ImportError as e:
        raise CLIError("tiny-gpt2 needs transformers (pip install 'einfuse[hf]')") from e
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=layers, n_head=4, n_positions=max(64, seq),
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    cfg._attn_implementation = "eager"
    model = tf.GPT2LMHeadModel(cfg)
    return model, torch.randint(0, cfg.vocab_size, (batch, seq))


def _smollm2(batch: int, seq: int, text: str | None, progress: Progress):
    import torch
    from einfuse.models.smollm2 import GGUF_NAME, smollm2_path
    if smollm2_path() is None:
        raise CLIError(f"smollm2: the weights ({GGUF_NAME}) are not cached; fetch them with "
                       "python -c 'from einfuse.models.smollm2 import fetch_smollm2; fetch_smollm2()'")
    from einfuse.models.smollm2 import load_smollm2
    with progress.step("loading SmolLM2-135M (dequantising the .gguf)"):
        model, tok = load_smollm2(fetch=False)
    words = Path(text).read_text()[:20000] if text else "First Citizen: Before we proceed any further, hear me speak."
    ids = tok(words, return_tensors="pt").input_ids[0]
    while ids.numel() < batch * seq:
        ids = torch.cat([ids, ids])
    return model, ids[: batch * seq].view(batch, seq)


def builtin_target(name: str, batch: int = 2, seq: int = 16, labels: bool = True, text: str | None = None,
                   progress: Progress | None = None, layers: int | None = None):
    """(model, args, kwargs) of a built-in target: tiny-llama, tiny-gpt2, smollm2."""
    import torch
    progress = progress or Progress(False)
    if name == "tiny-llama":
        from einfuse.models import TinyLlama, TinyLlamaConfig
        torch.manual_seed(0)
        model = TinyLlama(TinyLlamaConfig(layers=layers or 2))
        ids = torch.randint(0, model.config.vocab_size, (batch, seq))
        return model, (ids,), ({"labels": ids} if labels else {})
    if name == "tiny-gpt2":
        model, ids = _tiny_gpt2(batch, seq, layers or 2)
    elif name == "smollm2":
        if layers:
            raise CLIError("--layers is for the tiny built-ins; smollm2 has its 30")
        model, ids = _smollm2(batch, seq, text, progress)
    else:
        raise CLIError(f"unknown built-in target {name!r} (built-ins: {', '.join(BUILTINS)}; "
                       "or give package.module:callable)")
    kw = {"input_ids": ids}
    if labels:
        kw["labels"] = ids
    return model, (), kw


def _import_callable(target: str):
    mod, _, fn = target.rpartition(":")
    if not mod or not fn:
        raise CLIError(f"target {target!r}: expected a built-in name ({', '.join(BUILTINS)}) or "
                       "package.module:callable")
    if mod.endswith(".py") or os.sep in mod:
        path = Path(mod)
        if not path.is_file():
            raise CLIError(f"target {target!r}: no such file {mod}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # the console script does not put the working directory first
        module = importlib.import_module(mod)
    try:
        return getattr(module, fn)
    except AttributeError:
        raise CLIError(f"target {target!r}: module {mod} has no attribute {fn!r}") from None


def load_target(target: str, args: argparse.Namespace | None = None, progress: Progress | None = None):
    """(model, example_args, example_kwargs) for a CLI target."""
    if ":" not in target:
        a = args or argparse.Namespace()
        return builtin_target(target, getattr(a, "batch", 2), getattr(a, "seq", 16),
                              not getattr(a, "no_labels", False), getattr(a, "text", None), progress,
                              getattr(a, "layers", None))
    got = _import_callable(target)()
    if not (isinstance(got, tuple) and len(got) == 3 and isinstance(got[1], (tuple, list))
            and isinstance(got[2], dict)):
        raise CLIError(f"target {target!r} must return (model, example_args: tuple, example_kwargs: dict), "
                       f"got {type(got).__name__}")
    return got[0], tuple(got[1]), dict(got[2])


# ------------------------------------------------------------------------------------------------
# demo

def _rel_err(out, ref) -> float:
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


# ------------------------------------------------------------------------------------------------
# inspect

def _config(args, model, ex_args, ex_kwargs, progress: Progress):
    import einfuse
    from einfuse.config import OptimizeConfig
    opts: dict[str, Any] = {}
    if args.passes:
        opts["passes"] = tuple(p.strip() for p in args.passes.split(",") if p.strip())
    if args.quantize:
        opts["quantize"] = args.quantize
    if args.layer_skip:
        opts["layer_skip"] = args.layer_skip
    if args.sparsity:
        spec = {"method": args.sparsity, "target": args.sparsity_target}
        opts["sparsity"] = spec
        if args.sparsity == "chess" and args.sparsity_target > 0:
            calib_kwargs = {k: v for k, v in ex_kwargs.items() if k != "labels"}
            if ex_args and calib_kwargs:
                raise CLIError("--sparsity chess calibrates on the example inputs; give them all as positional "
                               "or all as keyword arguments")
            batches = [calib_kwargs if calib_kwargs else tuple(ex_args)] * args.calibration_batches
            with progress.step(f"calibrating CHESS thresholds on {args.calibration_batches} example batch(es)"):
                opts["calibration"] = einfuse.calibrate(model, batches, sparsity=spec, progress=progress.enabled)
    return OptimizeConfig(**opts)


def run_inspect(model, ex_args, ex_kwargs, config, progress: Progress):
    """Capture the model once through einfuse with `config` and return the Report."""
    import torch
    import einfuse
    torch._dynamo.reset()
    with progress.step("capturing the graph(s) and running the passes"):
        if config.quantize is None:
            return einfuse.inspect(model, *ex_args, config=config, **ex_kwargs)
        # quantization replaces the model's linear layers in place before capture: optimize() does it
        fast = einfuse.optimize(model, config=config)
        fast(*ex_args, **ex_kwargs)
        return fast.einfuse_report


def inspect_cmd(args) -> int:
    progress = Progress(not args.quiet)
    if args.target in BUILTINS or ":" not in args.target:
        target_name = args.target
    else:
        target_name = args.target.rpartition(":")[2]
    model, ex_args, ex_kwargs = load_target(args.target, args, progress)
    config = _config(args, model, ex_args, ex_kwargs, progress)
    report = run_inspect(model, ex_args, ex_kwargs, config, progress)
    options = {k: v for k, v in (("passes", args.passes), ("quantize", args.quantize),
                                 ("sparsity", f"{args.sparsity} {args.sparsity_target}" if args.sparsity else None),
                                 ("layer_skip", args.layer_skip or None)) if v}
    if args.format == "json":
        data = report.to_dict()
        data["target"] = args.target
        data["options"] = options
        text = json.dumps(data, indent=2, default=str)
    elif args.format == "html":
        n = sum(1 + bool(p.changed) for p in report.passes
                if p.changed or any(r.kind == p.name and not r.fused for r in report.regions))
        meta = {"target": args.target, "options": ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults",
                "example inputs": _describe_inputs(ex_args, ex_kwargs)}
        with progress.bar("drawing graphs", n) as advance:
            text = report.to_html(title=f"einfuse report: {target_name}", meta=meta, collapse=not args.no_collapse,
                                  pictures=not args.no_pictures, progress=advance)
    else:
        text = report.to_markdown()
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print(f"wrote {args.output} ({len(text.encode()):,} bytes); fusions: "
              + ", ".join(f"{k}={v}" for k, v in report.fusions.items()))
    else:
        sys.stdout.write(text)
    return 0


def _describe_inputs(ex_args, ex_kwargs) -> str:
    def d(v):
        shape = getattr(v, "shape", None)
        return f"{getattr(v, 'dtype', '')} {list(shape)}".strip() if shape is not None else type(v).__name__
    parts = [d(a) for a in ex_args] + [f"{k}: {d(v)}" for k, v in ex_kwargs.items()]
    return ", ".join(parts) or "none"


def passes_cmd(args) -> int:
    from einfuse.passes.pipeline import PIPELINE
    for name, fn in PIPELINE:
        doc = (fn.__doc__ or "").strip().splitlines()
        print(f"{name:<22} {doc[0] if doc else ''}")
    return 0


# ------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    p = argparse.ArgumentParser(prog="einfuse", parents=[common],
                                description="Fusion passes for PyTorch models: demo, inspect.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", parents=[common],
                   help="optimize a built-in tiny Llama, show what was fused, check against eager")
    sub.add_parser("passes", parents=[common], help="list the passes, in pipeline order")
    ins = sub.add_parser("inspect", parents=[common], help="report what the passes do to a model",
                         description="Capture TARGET once through einfuse and report what each pass matched, "
                                     "fused and rejected, with costs and generated kernels.")
    ins.add_argument("target", help=f"a built-in ({', '.join(BUILTINS)}), package.module:callable or "
                                    "file.py:callable; the callable returns (model, example_args, example_kwargs)")
    ins.add_argument("--format", choices=("md", "html", "json"), default="md", help="report format (default md)")
    ins.add_argument("-o", "--output", metavar="PATH", help="write the report here (default: stdout)")
    ins.add_argument("--passes", metavar="A,B", help="comma-separated passes to run (default: all; see `einfuse passes`)")
    ins.add_argument("--quantize", metavar="SCHEME", help="quantize linear layers: int8, int4, int6, llm_int8, w8a8")
    ins.add_argument("--sparsity", metavar="METHOD", choices=("chess", "moc", "coreinfer"),
                     help="activation sparsity of gated MLPs: chess (calibrated on the example inputs), moc, coreinfer")
    ins.add_argument("--sparsity-target", type=float, default=0.5, metavar="F",
                     help="fraction of MLP channels skipped (default 0.5)")
    ins.add_argument("--calibration-batches", type=int, default=2, metavar="N",
                     help="for --sparsity chess: how many times to run the example inputs to calibrate (default 2)")
    ins.add_argument("--layer-skip", type=float, default=0.0, metavar="F",
                     help="fraction of decoder layers to skip (default 0: off)")
    ins.add_argument("--batch", type=int, default=2, help="built-ins: batch size (default 2)")
    ins.add_argument("--seq", type=int, default=16, help="built-ins: sequence length (default 16)")
    ins.add_argument("--layers", type=int, help="tiny built-ins: number of layers (default 2)")
    ins.add_argument("--no-labels", action="store_true", help="built-ins: no labels (inference graph, no loss)")
    ins.add_argument("--text", metavar="PATH", help="smollm2: tokenize the example input from this text file")
    ins.add_argument("--no-collapse", action="store_true", help="html: draw every layer (no collapsing)")
    ins.add_argument("--no-pictures", action="store_true", help="html: leave the graph pictures out")
    ins.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("EINFUSE_DEBUG") == "1"
    try:
        return {"demo": demo, "inspect": inspect_cmd, "passes": passes_cmd}[args.cmd](args)
    except KeyboardInterrupt:
        print("einfuse: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        name = "" if isinstance(e, CLIError) else f"{type(e).__name__}: "
        print(f"einfuse: error: {name}{msg} (--debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
