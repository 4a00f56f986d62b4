"""The pass pipeline: one straight list of named passes, run in order.

Each pass is `(GraphModule, PassContext) -> GraphModule` and records what it
matched, changed and rejected in the context's report.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from .attention import fuse_attention
from .base import PassContext
from .rmsnorm import fuse_rmsnorm
from .rope import fuse_rope
from .swiglu import fuse_swiglu
from .linear_cross_entropy import fuse_linear_cross_entropy
from .layer_skip import fuse_layer_skip
from .sparsity import fuse_sparsity

log = logging.getLogger("einfuse")

PIPELINE = [
    ("attention", fuse_attention),             # softmax(q @ k^T * scale + mask) @ v, SDPA -> einfuse::attention
    ("rope", fuse_rope),                       # x*cos + rotate_half(x)*sin (q and k) -> einfuse::rope
    ("rmsnorm", fuse_rmsnorm),                 # x * rsqrt(mean(x^2) + eps) * w -> einfuse::rms_norm
    ("swiglu", fuse_swiglu),                   # act(gate(x)) * up(x) [-> down] -> einfuse::glu_mlp / glu
    ("linear_cross_entropy", fuse_linear_cross_entropy),  # lm_head + cross-entropy -> logit-free loss
    ("layer_skip", fuse_layer_skip),           # option layer_skip: bypass evenly spread middle residual blocks
    ("sparsity", fuse_sparsity),               # option sparsity: gated MLPs (or glu_mlp) -> einfuse::sparse_glu_mlp
]
PASS_NAMES = tuple(name for name, _ in PIPELINE)


def run_pipeline(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    enabled = ctx.config.passes
    for name, fn in PIPELINE:
        if enabled is not None and name not in enabled:
            continue
        before_regions = len(ctx.report.regions)
        before = gm.code
        out = fn(gm, ctx)
        new = ctx.report.regions[before_regions:]
        matched = sum(r.fused for r in new)
        changed = out is not gm and matched > 0
        if ctx.config.debug:
            out.graph.lint()
        from einfuse.report import PassRecord
        ctx.report.passes.append(PassRecord(ctx.graph_index, name, changed, before, out.code,
                                            matched, len(new) - matched))
        log.info("graph %d: pass %s fused %d, rejected %d", ctx.graph_index, name, matched, len(new) - matched)
        gm = out
    return gm
