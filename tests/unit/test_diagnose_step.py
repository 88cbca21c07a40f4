"""The step diagnosis (a GPU script) runs end to end on the CPU with a tiny Wan: per-variant step times,
an op table whose categorised total is positive, attention per block slot; kernel names categorise."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")


@pytest.fixture
def diagnose():
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module("diagnose_step")


def test_tiny_cpu_run_writes_per_variant_tables(diagnose, tmp_path, capsys):
    assert diagnose.main(["--device", "cpu", "--tiny", "--variants", "bf16,fp8+attn8", "--reps", "1",
                          "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "diagnose_wan2.1-t2v-1.3b.json").read_text())
    assert report["shape"] == "96x64x5, 48+512 tokens" and list(report["variants"]) == ["bf16", "fp8+attn8"]
    assert report["variants"]["fp8+attn8"]["quantization"] == "fp8"
    assert report["variants"]["fp8+attn8"]["attention"] == "fp8"
    for row in report["variants"].values():
        assert row["step_s"] > 0 and row["finite"] and row["blocks"] == 2
        cats = row["categories"]
        assert sum(c["ms"] for c in cats.values()) > 0 and {"gemm", "attention"} <= set(cats)
        assert cats["gemm"]["count"] == 2 * 10 + 6  # per block 2 x (q, k, v, o) + FFN; time, text MLPs, head
        assert row["totals"]["kernel_sum_ms"] > 0 and len(row["top_kernels"]) == 15
        assert [s["count"] for s in row["attention_slots"]] == [2, 2]  # self and cross, once per block
        assert row["kernels_per_block"] > 0 and row["block_kernels"][0]["cat"] == "attention"
        assert "step_minus_kernels_ms" in row and row["gaps"]["total_ms"] >= 0
    assert report["variants"]["fp8+attn8"]["rel_l2_vs_first"] == 0.0  # on the CPU both run bf16 SDPA
    assert (tmp_path / "kernels_wan2.1-t2v-1.3b_fp8_attn8.txt").read_text()
    out = capsys.readouterr().out
    assert "fp8+attn8" in out and "attention per block slot" in out


@pytest.mark.parametrize("model, shape, blocks", [
    ("cogvideox-5b", "96x64x9, 72+10 tokens, batch 2 (CFG)", 2),
    ("sd3.5-large", "64x64, 16+7 tokens, batch 2 (CFG)", 3),
])
def test_tiny_joint_attention_models(diagnose, tmp_path, model, shape, blocks):
    """Text and image/video tokens attend jointly: one attention call a block."""
    assert diagnose.main(["--device", "cpu", "--tiny", "--model", model, "--variants", "bf16",
                          "--reps", "1", "--clocks", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / f"diagnose_{model}.json").read_text())
    assert report["shape"] == shape
    row = report["variants"]["bf16"]
    assert row["finite"] and row["blocks"] == blocks
    assert [s["count"] for s in row["attention_slots"]] == [blocks]


def test_kernel_categories(diagnose):
    cat = diagnose.kernel_category
    assert cat("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128") == "attention"
    assert cat("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_bias_TNT") == "gemm"
    assert cat("_stats_kernel") == cat("_quant_kernel") == "attn8_quant"
    assert cat("_epilogue_kernel") == "attn8_epilogue" and cat("_quantize_rows_kernel") == "fp8_quant"
    assert cat("triton_poi_fused_cat_gelu_quantize_rows_fp8_split_with_sizes_transpose_view_2") == "inductor_fp8_quant"
    assert cat("triton_red_fused_native_layer_norm_0") == cat("triton_per_fused_mean_1") == "inductor_reduction"
    assert cat("triton_poi_fused_add_mul_3") == "inductor_pointwise"
    assert cat("cudnn::engines_precompiled::nchwToNhwcKernel") == "cudnn_other"
    assert cat("aten::linear") == "gemm" and cat("aten::scaled_dot_product_attention") == "attention"


def test_own_kernel_names_are_the_kernels(diagnose):
    """The names told apart are those of the Triton kernels in accel/ (a rename must update the table)."""
    pytest.importorskip("triton")
    for name, (module, _) in diagnose.OWN_KERNELS.items():
        kernel = getattr(importlib.import_module(f"ditserve.accel.{module}"), name)
        assert kernel.fn.__name__ == name


def test_variants_parse(diagnose):
    as_tuple = lambda v: tuple(diagnose.parse_variant(v).values())  # noqa: E731
    assert as_tuple("bf16") == (None, "auto", False, False)
    assert as_tuple("fp8") == ("fp8", "auto", False, False)
    assert as_tuple("fp8+attn8") == ("fp8", "fp8", False, False)
    assert as_tuple("attn8") == (None, "fp8", False, False)
    assert as_tuple("fp8+rows+fastacc") == ("fp8", "auto", True, True)
    with pytest.raises(SystemExit):
        diagnose.parse_variant("int4")


def test_block_view_of_a_graph_replay(diagnose):
    """Kernels as a CUDA-graph replay of 3 Wan-like blocks lays them out (1 us apart): the self and cross
    attention slots, one block's kernels in order from its first attention kernel, the gaps."""
    block = [("triton_red_fused_native_layer_norm_0", 5), ("nvjet_sm90_tst_qkv", 20), ("_quant_kernel", 4),
             ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_f8", 100), ("nvjet_sm90_tst_o", 8),
             ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_f16", 10), ("triton_poi_fused_add_mul_3", 3)]
    names = [("cudnn_generated_fort_native_conv3d", 7)] + block * 3 + [("nvjet_sm90_tst_head", 2)]
    kernels, ts = [], 0.0
    for name, dur in names:
        kernels.append({"name": name, "ts": ts, "dur": float(dur)})
        ts += dur + 1.0
    view = diagnose.block_view(kernels, blocks=3)
    assert [(s["count"], s["median_us"]) for s in view["attention_slots"]] == [(3, 100.0), (3, 10.0)]
    assert view["kernels_per_block"] == 7 and view["blocks_with_that_period"] == 2
    assert [r["name"][:12] for r in view["block_kernels"][:2]] == ["cudnn_genera", "nvjet_sm90_t"]
    assert view["block_ms"] * 1e3 == sum(d for _, d in block) + 7  # kernels and the gap before each
    assert view["block_by_category_ms"]["attn8_quant"] == 4e-3 and view["block_by_category_ms"]["gap"] == 7e-3
    gaps = diagnose.gap_stats(kernels)
    assert gaps["under_2us"]["count"] == len(kernels) - 1 and gaps["total_ms"] == (len(kernels) - 1) / 1e3
