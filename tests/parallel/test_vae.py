"""Parallel video decode: two gloo ranks each decode half of the spatial tiles; the frames equal one
process's tiled decode (diffusers' own tiling) within 1/255, for Wan 2.1's VAE and Wan 2.2's patched
one; through `apply_parallel_decode` the pipeline's own decode stage uses it."""

import multiprocessing as mp
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

TILES = dict(height=32, width=32, stride_height=16, stride_width=16)  # 48x80 frames: 3 x 5 tiles


def latents(vae, seed: int = 0) -> torch.Tensor:
    from ditserve.vae.wan import VideoLatentShape

    shape = VideoLatentShape.of(vae).latents(5, 48, 80)
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))


VARIANTS = ("t2v", "ti2v")


def rank_main(rank: int, folders: dict, work: str) -> None:
    """Both VAEs on one gloo group (processes started once for the module)."""
    import torch.distributed as dist

    from ditserve.parallel.groups import Axis
    from ditserve.parallel.vae import ParallelDecode
    from ditserve.vae.wan import Tiles, decode_wan, load_wan_vae

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{work}/store", rank=rank, world_size=2)
        for variant, folder in folders.items():
            vae = load_wan_vae(Path(folder) / "vae", "cpu", torch.float32)
            vae.decode = ParallelDecode(vae, Axis(None, rank, 2, (0, 1)), Tiles(**TILES))
            frames = decode_wan(vae, latents(vae))
            if rank == 0:
                np.save(f"{work}/frames_{variant}.npy", frames)
        dist.barrier()  # neither rank tears gloo down while the other still uses it (rank 0 aborted, -6)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the test
        Path(f"{work}/rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def parallel_frames(tiny_wan, tmp_path_factory):
    """Rank 0's frames per variant, decoded by two ranks."""
    work = tmp_path_factory.mktemp("parallel_vae")
    folders = {v: str(tiny_wan(v)) for v in VARIANTS}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, folders, str(work))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    errors = [e.read_text() for e in work.glob("*.err")]
    assert not errors and all(p.exitcode == 0 for p in procs), ([p.exitcode for p in procs], "\n".join(errors))
    return {v: np.load(work / f"frames_{v}.npy") for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_parallel_decode_equals_the_tiled_decode(tiny_wan, variant, parallel_frames):
    from ditserve.vae.wan import Tiles, decode_wan, load_wan_vae

    folder = tiny_wan(variant)
    got = parallel_frames[variant]
    vae = load_wan_vae(folder / "vae", "cpu", torch.float32)
    expected = decode_wan(vae, latents(vae), tiled=True, tiles=Tiles(**TILES))
    whole = decode_wan(vae, latents(vae))
    assert got.shape == expected.shape == (1, 5, 48, 80, 3)
    assert expected.std() > 10
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(whole.astype(int) - expected.astype(int)).max() > 1  # the tiles are really in play
