"""What accel/ and parallel/ may do to SD3DiT."""

from ditserve.models.common.plan import DiTPlan, SequenceLayout, TensorLayout

SD3_PLAN = DiTPlan(
    block_lists=("joint_blocks",),
    head="final_layer",
    # attention and MLP projections; the per-sample modulation rows stay in high precision
    fp8=("*attn.qkv", "*attn.proj", "attn2.qkv", "attn2.proj", "*_mlp.0", "*_mlp.2"),
    fp8_keep=("*_mod.lin", "txt_mod"),
    # the joint attention and MMDiT-X's image-only attention (set on every block; used where dual)
    attention_sites=("attn_op", "attn2_op"),
    qk_rope_site=None,  # no rotary embedding: QK RMSNorm alone, which compile fuses into the projections
    teacache=None,  # no published fit for SD3
    token_sites=("img_mlp", "txt_mlp"),  # per-token feed-forwards: may run over the sequence in chunks
    # heads split across ranks: q/k/v and the MLP input by output, the projections back by input; the
    # blocks count heads from the projection width and the QK norm is per head, so nothing else changes
    tensor=TensorLayout(column=("*attn.qkv", "attn2.qkv", "*_mlp.0"), row=("*attn.proj", "attn2.proj", "*_mlp.2")),
    # streams (img, txt), joined as (img, txt) for attention; consts (vec, grid); MMDiT-X's second
    # attention runs over the image stream alone, with that stream's padding masked
    sequence=SequenceLayout(joint_order=(0, 1), consts=("same", "same"), self_attention_sites=("attn_op",),
                            stream_attention_sites=(("attn2_op", (0,)),), head_streams=(0,)),
)
