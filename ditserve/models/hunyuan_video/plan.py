"""What accel/ and parallel/ may do to HunyuanVideoDiT."""

from ditserve.models.common.plan import DiTPlan, SequenceLayout, TensorLayout

HUNYUAN_VIDEO_PLAN = DiTPlan(
    block_lists=("double_blocks", "single_blocks"),
    head="final_layer",
    # attention and MLP projections; the per-sample modulation rows stay in high precision
    fp8=("*attn.qkv", "*attn.proj", "*_mlp.0", "*_mlp.2", "linear1", "linear2"),
    fp8_keep=("*mod.lin", "modulation.lin"),
    attention_sites=("attn_op",),
    qk_rope_site="qkv_op",
    # streams (img, txt), joined as (txt, img) for attention; consts (vec, rope over (txt, img), key mask
    # over (txt, img) or None): the text padding stays masked on every rank
    sequence=SequenceLayout(joint_order=(1, 0), consts=("same", "rope", "key_mask"), self_attention_sites=("attn_op",),
                            head_streams=(0,)),
    # as FLUX: heads split across ranks; linear2's input is [attention, MLP], split segment by segment
    tensor=TensorLayout(column=("*attn.qkv", "*_mlp.0", "linear1"), row=("*attn.proj", "*_mlp.2", "linear2"),
                        row_segments=(("linear2", ("dim", "mlp_hidden")),), divide=("heads", "dim", "mlp_hidden")),
)
