"""What accel/ and parallel/ may do to QwenImageDiT."""

from ditserve.models.common.plan import DiTPlan, SequenceLayout, TensorLayout

QWEN_IMAGE_PLAN = DiTPlan(
    block_lists=("double_blocks",),
    head="final_layer",
    fp8=("*attn.qkv", "*attn.proj", "*_mlp.0", "*_mlp.2"),
    fp8_keep=("*mod.lin",),
    attention_sites=("attn_op",),
    qk_rope_site="qkv_op",
    token_sites=("img_mlp", "txt_mlp"),  # per-token feed-forwards: may run over the sequence in chunks
    # streams (img, txt), joined as (txt, img); consts (vec, rope, key mask over (txt, img) or None,
    # per-token modulation index [B, L] over the image tokens or None)
    sequence=SequenceLayout(joint_order=(1, 0), consts=("same", "rope", "key_mask", "per_token"),
                            self_attention_sites=("attn_op",), head_streams=(0,)),
    tensor=TensorLayout(column=("*attn.qkv", "*_mlp.0"), row=("*attn.proj", "*_mlp.2"), divide=("heads",)),
)
