"""What accel/ and parallel/ may do to CogVideoXDiT."""

from ditserve.models.common.plan import DiTPlan

COGVIDEOX_PLAN = DiTPlan(
    block_lists=("layers",),
    head="head_out",
    # the joint attention's projections and the feed-forward; the expert norms' modulation linears
    # make one row per sample from the time embedding, where FP8 saves nothing and costs accuracy
    fp8=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "ff.0", "ff.2"),
    fp8_keep=("norm?.linear",),
    attention_sites=("attn.attn_op",),
    qk_rope_site=None,  # QK LayerNorm (with a bias), not the RMSNorm the fused kernel implements
    teacache=None,  # no fit published for CogVideoX in ditserve's sources
    # sequence and tensor parallelism: not declared yet (streams (x, txt) are joint text-first with
    # a rotary table over the joint sequence, which a future SequenceLayout can describe)
)
