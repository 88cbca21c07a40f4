"""What accel/ and parallel/ may do to HunyuanVideoDiT."""

from ditserve.models.common.mmdit import modulate
from ditserve.models.common.plan import DiTPlan, SequenceLayout, TeaCacheFit, TensorLayout


def first_block_modulated_video(dit, h):
    """The video tokens as the first dual-stream block's attention sees them: LayerNorm, then the
    block's first shift and scale from the conditioning vector (TeaCache4HunyuanVideo's signal)."""
    img, vec = h.streams[0], h.consts[0]
    shift, scale = dit.double_blocks[0].img_mod(vec)[:2]
    return modulate(img, shift, scale)


HUNYUAN_VIDEO_TEACACHE = TeaCacheFit(
    coefficients=(7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02),
    signal=first_block_modulated_video,
    threshold=0.15,  # published: 0.1 ~1.6x, 0.15 ~2.1x on HunyuanVideo 720p
    warmup_steps=1,
    source="TeaCache4HunyuanVideo (ali-vilab/TeaCache), fitted on HunyuanVideo T2V",
)

HUNYUAN_VIDEO_PLAN = DiTPlan(
    block_lists=("double_blocks", "single_blocks"),
    head="final_layer",
    # attention and MLP projections; the per-sample modulation rows stay in high precision
    fp8=("*attn.qkv", "*attn.proj", "*_mlp.0", "*_mlp.2", "linear1", "linear2"),
    fp8_keep=("*mod.lin", "modulation.lin"),
    attention_sites=("attn_op",),
    qk_rope_site="qkv_op",
    teacache=lambda cfg: HUNYUAN_VIDEO_TEACACHE if cfg.num_layers > 0 else None,
    token_sites=("img_mlp", "txt_mlp"),  # per-token feed-forwards: may run over the sequence in chunks
    # streams (img, txt), joined as (txt, img) for attention; consts (vec, rope over (txt, img), key mask
    # over (txt, img) or None): the text padding stays masked on every rank
    sequence=SequenceLayout(joint_order=(1, 0), consts=("same", "rope", "key_mask"), self_attention_sites=("attn_op",),
                            head_streams=(0,)),
    # as FLUX: heads split across ranks; linear2's input is [attention, MLP], split segment by segment
    tensor=TensorLayout(column=("*attn.qkv", "*_mlp.0", "linear1"), row=("*attn.proj", "*_mlp.2", "linear2"),
                        row_segments=(("linear2", ("dim", "mlp_hidden")),), divide=("heads", "dim", "mlp_hidden")),
)
