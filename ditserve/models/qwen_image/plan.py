"""What accel/ and parallel/ may do to QwenImageDiT."""

from ditserve.models.common.plan import DiTPlan

QWEN_IMAGE_PLAN = DiTPlan(
    block_lists=("double_blocks",),
    head="final_layer",
    fp8=("*attn.qkv", "*attn.proj", "*_mlp.0", "*_mlp.2"),
    fp8_keep=("*mod.lin",),
    attention_sites=("attn_op",),
    qk_rope_site="qkv_op",
)
