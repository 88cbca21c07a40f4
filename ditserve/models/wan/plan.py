"""What accel/ and parallel/ may do to WanDiT."""

from ditserve.models.common.plan import DiTPlan

WAN_PLAN = DiTPlan(
    block_lists=("layers",),
    head="head_out",
    # attention projections and the FFN; modulation lives in float32 tables, not linears
    fp8=("attn?.to_q", "attn?.to_k", "attn?.to_v", "attn?.to_out", "attn2.add_k_proj", "attn2.add_v_proj",
         "ffn.0", "ffn.2"),
    attention_sites=("attn1.attn_op", "attn2.attn_op"),
    qk_rope_site=None,  # QK RMSNorm spans all heads: the fused per-head kernel does not apply
)
