"""What accel/ and parallel/ may do to FluxDiT."""

from ditserve.models.common.plan import DiTPlan

FLUX_PLAN = DiTPlan(
    block_lists=("double_blocks", "single_blocks"),
    head="final_layer",
    # attention and MLP projections; the per-sample modulation rows stay in high precision
    fp8=("*attn.qkv", "*attn.proj", "*_mlp.0", "*_mlp.2", "linear1", "linear2"),
    fp8_keep=("*mod.lin", "modulation.lin"),
    attention_sites=("attn_op",),
    qk_rope_site="qkv_op",
)
