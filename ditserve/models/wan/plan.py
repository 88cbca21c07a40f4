"""What accel/ and parallel/ may do to WanDiT."""

from ditserve.models.common.plan import DiTPlan, SequenceLayout, TeaCacheFit, TensorLayout

# TeaCache4Wan2.1 (ali-vilab/TeaCache, teacache_generate.py), as republished in SGLang Diffusion's Wan
# sampling configs: the "ret-steps" fits are on the time modulation (six vectors), the others on the
# time embedding. Wan 2.2's A14B experts share the 14B shapes and get the 2.1 14B fits.
_SOURCE = "TeaCache4Wan2.1 (ali-vilab/TeaCache)"


def time_modulation(dit, h):
    """The six modulation vectors from the time embedding (Hidden.consts[1])."""
    return h.consts[1]


def time_embedding(dit, h):
    """The time embedding (Hidden.consts[3])."""
    return h.consts[3]


WAN_TEACACHE_1_3B = TeaCacheFit(
    coefficients=(-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    signal=time_modulation, threshold=0.08, warmup_steps=5, source=_SOURCE + ", T2V-1.3B, ret-steps")
WAN_TEACACHE_14B_T2V = TeaCacheFit(
    coefficients=(-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    signal=time_embedding, threshold=0.2, warmup_steps=1, source=_SOURCE + ", T2V-14B")
WAN_TEACACHE_14B_I2V = TeaCacheFit(
    coefficients=(-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    signal=time_modulation, threshold=0.26, warmup_steps=5, source=_SOURCE + ", I2V-14B, ret-steps")


def wan_teacache(cfg):
    """The fit for a checkpoint's shape; None for shapes without a published fit (e.g. TI2V-5B)."""
    if cfg.hidden_size == 1536 and cfg.in_channels == 16:
        return WAN_TEACACHE_1_3B
    if cfg.hidden_size == 5120:
        return {16: WAN_TEACACHE_14B_T2V, 36: WAN_TEACACHE_14B_I2V}.get(cfg.in_channels)
    return None


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
    cross_attention_sites=("attn2.attn_op",),
    qk_rope_site=None,  # QK RMSNorm spans all heads: the fused per-head kernel does not apply
    teacache=wan_teacache,
    # everything but the self-attention maps each token on its own: the modulated norms, the rotary
    # embedding, the gated residuals, the cross-attention (queries per token) and the FFN
    token_sites=("modulate", "attn_residual", "cross_attention", "ffn_residual", "attn1.rope_op"),
    token_sites_in_place=("attn1.rope_op",),  # the unrotated query and key are dropped right after
    # eager on CUDA: one Triton pass each instead of PyTorch's float32 kernels (inductor fuses them compiled)
    eager_kernels=(("modulate_op", "norm_modulate"), ("norm_op", "norm_affine"), ("residual_op", "gated_add"),
                   ("attn1.rope_op", "rope_")),
    # stream (x,); consts (context, mod, rope, temb, grid): mod is per token with TI2V's per-token timesteps
    sequence=SequenceLayout(joint_order=(0,), consts=("same", "per_token", "rope", "same", "same"),
                            self_attention_sites=("attn1.attn_op",), head_streams=(0,)),
    # the QK norms span all heads, so under TP they sum their statistics across ranks
    tensor=TensorLayout(column=("attn?.to_q", "attn?.to_k", "attn?.to_v", "attn2.add_k_proj", "attn2.add_v_proj",
                                "ffn.0"),
                        row=("attn?.to_out", "ffn.2"), divide=("attn1.heads", "attn2.heads"),
                        norms=("attn?.norm_q", "attn?.norm_k", "attn2.norm_added_k")),
)
