"""What accel/ and parallel/ may do to WanDiT."""

from ditserve.models.common.plan import DiTPlan

WAN_PLAN = DiTPlan(
    block_lists=("layers",),
    head="head_out",
    # the attention projections (self, cross, image key/value) and the FFN; the modulation is a
    # float32 table plus the time embedding, not a block linear, so nothing needs keeping
    fp8=("attn?.to_q", "attn?.to_k", "attn?.to_v", "attn?.to_out", "attn2.add_k_proj", "attn2.add_v_proj",
         "ffn.0", "ffn.2"),
    # attn1: self-attention over the video tokens (with RoPE); attn2: cross-attention, whose keys and
    # values are the text (and image) tokens, the same on every rank under sequence parallelism
    attention_sites=("attn1.attn_op", "attn2.attn_op"),
    qk_rope_site=None,  # QK RMSNorm spans all heads: the fused per-head kernel does not apply
)
