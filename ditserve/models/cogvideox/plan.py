"""What accel/ and parallel/ may do to CogVideoXDiT."""

from ditserve.models.common.plan import DiTPlan, SequenceLayout, TensorLayout

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
    token_sites=("ff",),  # per-token feed-forwards: may run over the sequence in chunks
    # streams (x, txt), joined text first; consts (temb, rope, grid): the rotary table runs over the
    # joint sequence (identity rows for the text; None for 2B, whose sin-cos positions are added in embed)
    sequence=SequenceLayout(joint_order=(1, 0), consts=("same", "rope", "same"),
                            self_attention_sites=("attn.attn_op",), head_streams=(0,)),
    # per-head QK LayerNorm: a rank's heads normalise on their own
    tensor=TensorLayout(column=("attn.to_q", "attn.to_k", "attn.to_v", "ff.0"), row=("attn.to_out", "ff.2"),
                        divide=("attn.heads",)),
)
