"""What accel/ and parallel/ may do to FluxDiT."""

from ditserve.models.common.mmdit import modulate
from ditserve.models.common.plan import DiTPlan, SequenceLayout, TeaCacheFit, TensorLayout


def first_block_modulated_image(dit, h):
    """The image tokens as the first double block's attention sees them: LayerNorm, then the
    block's first shift and scale from the conditioning vector (TeaCache4FLUX's signal)."""
    img, vec = h.streams[0], h.consts[0]
    shift, scale = dit.double_blocks[0].img_mod(vec)[:2]
    return modulate(img, shift, scale)


FLUX_TEACACHE = TeaCacheFit(
    coefficients=(4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
    signal=first_block_modulated_image,
    threshold=0.4,  # published: 0.25 ~1.5x, 0.4 ~1.8x, 0.6 ~2.0x, 0.8 ~2.25x on FLUX.1-dev
    warmup_steps=1,
    source="TeaCache4FLUX (ali-vilab/TeaCache), fitted on FLUX.1-dev",
)

FLUX_PLAN = DiTPlan(
    block_lists=("double_blocks", "single_blocks"),
    head="final_layer",
    # attention and MLP projections; the per-sample modulation rows stay in high precision
    fp8=("*attn.qkv", "*attn.proj", "*_mlp.0", "*_mlp.2", "linear1", "linear2"),
    fp8_keep=("*mod.lin", "modulation.lin"),
    attention_sites=("attn_op",),
    qk_rope_site="qkv_op",
    teacache=lambda cfg: FLUX_TEACACHE if cfg.num_layers > 0 else None,
    token_sites=("img_mlp", "txt_mlp"),  # per-token feed-forwards: may run over the sequence in chunks
    # streams (img, txt), joined as (txt, img) for attention; consts (vec, rope)
    sequence=SequenceLayout(joint_order=(1, 0), consts=("same", "rope"), self_attention_sites=("attn_op",),
                            head_streams=(0,)),
    # heads split across ranks: q/k/v (and the single block's MLP input) by output, the projections back
    # by input; linear2's input is [attention, MLP], split segment by segment
    tensor=TensorLayout(column=("*attn.qkv", "*_mlp.0", "linear1"), row=("*attn.proj", "*_mlp.2", "linear2"),
                        row_segments=(("linear2", ("dim", "mlp_hidden")),), divide=("heads", "dim", "mlp_hidden")),
)
