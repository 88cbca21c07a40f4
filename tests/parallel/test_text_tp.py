"""Tensor-parallel T5 / UMT5 text encoders (parallel/text_tp.py) on a real gloo group of 2 CPU ranks:
the embeddings equal the single process's, each rank holds about half of the layers' weights and
reads only its slices. The tiny encoders have 2 heads and an FFN 37 wide, so the FFN splits
unevenly (19 + 18). End-to-end pixels of FLUX and Wan with --tp-size 2 (text encoder included) are
compared in test_modes.py."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

PROMPTS = ["a lighthouse at dusk, waves breaking on the rocks", "a fox"]
T5_LENGTH, UMT5_LENGTH = 31, 40


def _encoders(flux: Path, wan: Path):
    from ditserve.encoders.text import T5SequenceEncoder
    from ditserve.encoders.umt5 import UMT5Encoder

    t5 = T5SequenceEncoder.load(flux / "text_encoder_2", flux / "tokenizer_2", "cpu", torch.float32)
    umt5 = UMT5Encoder.load(wan / "text_encoder", wan / "tokenizer", "cpu", torch.float32)
    return t5, umt5


def _embed(t5, umt5) -> dict[str, np.ndarray]:
    return {"t5": t5(PROMPTS, T5_LENGTH).numpy(), "umt5": umt5(PROMPTS, UMT5_LENGTH).numpy()}


def _rank(rank: int, world: int, work: str, flux: str, wan: str) -> None:
    import torch.distributed as dist

    from ditserve import parallel
    from ditserve.config import ParallelConfig
    from ditserve.parallel.groups import init_groups

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    out = Path(work)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world)
    try:
        groups = init_groups(ParallelConfig(num_gpus=world, tp_size=world), torch.device("cpu"))
        with parallel.loading(groups):
            t5, umt5 = _encoders(Path(flux), Path(wan))
        for name, states in _embed(t5, umt5).items():
            np.save(out / f"{name}.rank{rank}.npy", states)
        held = {"t5": sum(p.numel() for p in t5.model.parameters()),
                "umt5": sum(p.numel() for p in umt5.model.parameters())}
        (out / f"held.rank{rank}.json").write_text(json.dumps(held))
    except Exception:  # the test reads the failure and reports it
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def folders(tiny_flux_dev, tiny_wan):
    return Path(tiny_flux_dev), Path(tiny_wan("t2v"))


@pytest.fixture(scope="module")
def world2(folders, tmp_path_factory):
    """Each rank's embeddings and parameter counts, from a TP group of 2."""
    work = tmp_path_factory.mktemp("text_tp")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, 2, str(work), *map(str, folders))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        if p.is_alive():
            p.kill()
            p.join()
    errors = sorted(work.glob("*.err"))
    if errors or any(p.exitcode for p in procs):
        raise RuntimeError("ranks failed:\n" + "\n".join(e.read_text() for e in errors)
                           + f"\nexit codes {[p.exitcode for p in procs]}")
    states = {f"{name}.{r}": np.load(work / f"{name}.rank{r}.npy") for name in ("t5", "umt5") for r in range(2)}
    held = [json.loads((work / f"held.rank{r}.json").read_text()) for r in range(2)]
    return states, held


@pytest.fixture(scope="module")
def single(folders):
    """The single-process encoders (transformers' from_pretrained) and their embeddings."""
    t5, umt5 = _encoders(*folders)
    return {"t5": t5.model, "umt5": umt5.model}, _embed(t5, umt5)


@pytest.mark.parametrize("name", ["t5", "umt5"])
def test_sharded_encoder_gives_the_single_process_embeddings(world2, single, name):
    states, _ = world2
    expected = single[1][name]
    assert np.abs(expected).max() > 0.1  # a real output, not zeros
    for r in range(2):
        np.testing.assert_allclose(states[f"{name}.{r}"], expected, rtol=1e-5, atol=1e-5)


def _replicated(model) -> int:
    """Parameters every rank keeps whole: the token embedding and the layer norms."""
    return sum(p.numel() for n, p in model.named_parameters() if "shared" in n or "layer_norm" in n)


@pytest.mark.parametrize("name", ["t5", "umt5"])
def test_each_rank_holds_about_half_of_the_layers(world2, single, name):
    _, held = world2
    model = single[0][name]
    full, replicated = sum(p.numel() for p in model.parameters()), _replicated(model)
    ranks = [h[name] for h in held]
    assert sum(ranks) == full + replicated  # the cut parameters partition exactly
    for n in ranks:
        assert abs((n - replicated) / (full - replicated) - 0.5) < 0.03


def test_a_rank_reads_only_its_slices(folders, monkeypatch):
    """Rank 1 of 2 reads the second half of q's rows, of o's columns and of the bias table's heads,
    and 18 of the FFN's 37 features; no cut tensor is read whole."""
    import transformers
    from safetensors import safe_open

    from ditserve.parallel import text_tp
    from ditserve.parallel.groups import Axis
    from ditserve.parallel.tensor import RowParallelLinear

    reads: list[tuple[str, tuple[int, ...]]] = []

    class Recording:
        def __init__(self, path, framework):
            self.handle = safe_open(path, framework=framework)

        def __enter__(self):
            self.file = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_slice(self, key):
            part = self.file.get_slice(key)

            class Slice:
                def __getitem__(_, index):
                    tensor = part[index]
                    reads.append((key, tuple(tensor.shape)))
                    return tensor

            return Slice()

    monkeypatch.setattr(text_tp, "safe_open", Recording)
    folder = folders[1] / "text_encoder"
    model = text_tp.load_sharded(transformers.UMT5EncoderModel, folder, "cpu", torch.float32, Axis(None, 1, 2))
    whole = transformers.UMT5EncoderModel.from_pretrained(str(folder))
    shapes = dict(reads)
    for layer in range(2):
        ours = model.encoder.block[layer].layer
        theirs = whole.encoder.block[layer].layer
        attn, ref = ours[0].SelfAttention, theirs[0].SelfAttention
        assert (attn.n_heads, attn.inner_dim) == (1, 16)
        assert isinstance(attn.o, RowParallelLinear)
        torch.testing.assert_close(attn.q.weight, ref.q.weight[16:])
        torch.testing.assert_close(attn.o.weight, ref.o.weight[:, 16:])
        torch.testing.assert_close(attn.relative_attention_bias.weight, ref.relative_attention_bias.weight[:, 1:])
        ffn, ref_ffn = ours[1].DenseReluDense, theirs[1].DenseReluDense
        torch.testing.assert_close(ffn.wi_0.weight, ref_ffn.wi_0.weight[19:])
        torch.testing.assert_close(ffn.wo.weight, ref_ffn.wo.weight[:, 19:])
        assert shapes[f"encoder.block.{layer}.layer.1.DenseReluDense.wo.weight"] == (24, 18)
        assert shapes[f"encoder.block.{layer}.layer.0.SelfAttention.k.weight"] == (16, 24)
    full = {n: tuple(t.shape) for n, t in whole.named_parameters()}
    cut = [k for k in shapes if "SelfAttention" in k or "DenseReluDense" in k]
    assert len(cut) == 2 * 8  # q, k, v, o, bias table, wi_0, wi_1, wo in each layer
    for key in cut:
        assert 0.45 < np.prod(shapes[key]) / np.prod(full[key]) <= 0.5, key
    assert model.shared.weight is model.encoder.embed_tokens.weight  # still tied


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtypes_follow_from_pretrained(folders, dtype):
    """T5's `wo` stays float32 exactly where transformers keeps it so."""
    import transformers

    from ditserve.encoders.text import _DTYPE_KW
    from ditserve.parallel.groups import Axis
    from ditserve.parallel.text_tp import load_sharded

    folder = folders[0] / "text_encoder_2"
    ours = load_sharded(transformers.T5EncoderModel, folder, "cpu", dtype, Axis(None, 0, 2))
    theirs = transformers.T5EncoderModel.from_pretrained(str(folder), **{_DTYPE_KW: dtype})
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}


def test_heads_that_do_not_divide_are_refused_before_loading(folders, monkeypatch):
    import transformers

    from ditserve.api import InvalidRequest
    from ditserve.parallel import text_tp
    from ditserve.parallel.groups import Axis

    def no_reading(*args, **kwargs):
        raise AssertionError("read the checkpoint before checking the heads")

    monkeypatch.setattr(text_tp, "safe_open", no_reading)
    with pytest.raises(InvalidRequest, match=r"--tp-size 3 needs the text encoder's 2 attention heads") as err:
        text_tp.load_sharded(transformers.T5EncoderModel, folders[0] / "text_encoder_2", "cpu", torch.float32,
                             Axis(None, 0, 3))
    assert "\n" not in str(err.value)
