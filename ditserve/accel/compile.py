"""torch.compile per repeated block: identical blocks share one compiled graph.

`wide_rows` (AccelConfig.row_fusion) lets inductor hold a whole DiT row in registers for reductions
along it (persistent reductions up to WIDE_ROW elements instead of its default 1024): LayerNorm / RMSNorm
over 1.5-5k channels and the fp8 activation quantiser's row amax then run as one pass over the row
inside the kernel that produces it, so the quantised input of an fp8 linear is written once, in e4m3,
instead of in bf16 and read again by a separate quantise pass (accel/fp8.py)."""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

WIDE_ROW = 16384  # the widest row a DiT quantises: the feed-forward's hidden width (FLUX 12288, Wan-14B 13824)


def _wide_row_choices():
    """An InductorChoices that also makes inner reductions of up to WIDE_ROW elements persistent."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WideRowChoices(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs):
                return True
            return (not cooperative_reduction and features.get_reduction_hint() == ReductionHint.INNER
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, WIDE_ROW))

        def uuid(self) -> str:  # the FX graph cache's key: graphs compiled with this heuristic differ
            return f"ditserve-wide-rows-{WIDE_ROW}"

    return WideRowChoices()


def wide_rows(on: bool = True) -> None:
    """Use the wide-row heuristic for every compile from now on in this process (`on`), or stop using it."""
    import torch._inductor.config as inductor

    if hasattr(inductor, "inductor_choices_class"):  # a config key: part of the FX graph cache's key
        if on:
            inductor.inductor_choices_class = _wide_row_choices
        elif inductor.inductor_choices_class is _wide_row_choices:
            inductor.inductor_choices_class = None
        return
    # older torch: the handler is per thread, and the FX graph cache could not tell the graphs apart
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    ours = type(V.choices).__name__ == "WideRowChoices"
    if on and not ours:
        V.set_choices_handler(_wide_row_choices())
        inductor.fx_graph_cache = False
    elif not on and ours:
        V.set_choices_handler(InductorChoices())


def apply_compile(dit: nn.Module, mode: str | None = None, wide: bool = False) -> nn.Module:
    """Compile each block of `dit.blocks` in place (fullgraph), plus the plan's head module; `wide`:
    with `wide_rows`.

    Compiling block by block keeps compile time to one graph per block type while letting
    inductor fuse the elementwise work (norm + modulation, QK-norm + RoPE, gated residuals).
    """
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = True
    inductor.epilogue_fusion = True
    wide_rows(wide)
    for block in dit.blocks:
        block.compile(fullgraph=True, dynamic=False, mode=mode)
    getattr(dit, dit.plan.head).compile(fullgraph=True, dynamic=False, mode=mode)
    log.info("compiled %d blocks (mode=%s%s)", len(dit.blocks), mode or "default", ", wide rows" if wide else "")
    return dit
