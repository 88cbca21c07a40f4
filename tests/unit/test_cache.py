"""Step caching (accel/cache.py): the decisions of each method, where their state lives, what they
reuse, and that the pipelines run with them (FLUX demo, Qwen-Image, Wan) on the CPU."""

from __future__ import annotations

import argparse
import datetime
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from torch import nn

from ditserve.accel.cache import STATE_KEY, apply_cache, step_cache
from ditserve.accel.segments import SegmentedDiT
from ditserve.api import InvalidRequest
from ditserve.cli.engine_args import add_cache_arguments, cache_config_from_args
from ditserve.api.output import CACHE_STATS_KEY, CacheStats, Timings
from ditserve.config.engine import AccelConfig, CacheConfig
from ditserve.models.common.dit import DiT, Hidden, StepContext
from ditserve.models.common.plan import DiTPlan, TeaCacheFit

# -- a toy DiT whose blocks say what they do ----------------------------------------------------


@dataclass
class ToyInputs:
    x: torch.Tensor  # [B, L, D]
    t: torch.Tensor  # [B]


def _signal(dit, h):
    return h.consts[0][:, None]  # the "timestep" itself, so the test knows every relative change


TOY_FIT = TeaCacheFit(coefficients=(1.0, 0.0), signal=_signal, threshold=0.3, warmup_steps=1)  # rescale(x) = x


class ToyBlock(nn.Module):
    """mix: x + tanh(x W) per token; const: x + v; time: x + t v; time2: x + t^2 v."""

    def __init__(self, kind: str, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g) / math.sqrt(dim))
        self.v = nn.Parameter(torch.randn(dim, generator=g))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        if self.kind == "mix":
            return x + torch.tanh(x @ self.w)
        if self.kind == "const":
            return x + self.v
        power = 1 if self.kind == "time" else 2
        return x + (t ** power)[:, None, None] * self.v


class ToyDiT(DiT):
    plan = DiTPlan(block_lists=("layers",), head="out", teacache=lambda cfg: TOY_FIT)
    cfg = None

    def __init__(self, kinds=("mix",) * 4, dim: int = 8):
        super().__init__()
        self.layers = nn.ModuleList(ToyBlock(k, dim, seed=i) for i, k in enumerate(kinds))
        self.out = nn.Identity()

    def embed(self, inp: ToyInputs) -> Hidden:
        return Hidden((inp.x,), (inp.t,))

    def head(self, h: Hidden) -> torch.Tensor:
        return self.out(h.streams[0])


class Run:
    """Drives a DiT step by step with per-branch states kept across steps, as the denoising loop does."""

    def __init__(self, dit, num_steps: int = 10, branches=("cond", "uncond")):
        self.dit, self.num_steps = dit, num_steps
        self.states = {b: {} for b in branches}

    def __call__(self, step: int, inp: ToyInputs, branches=("cond",), **ctx_fields) -> torch.Tensor:
        ctx = StepContext(step, self.num_steps, 0, tuple(branches), tuple(self.states[b] for b in branches))
        for name, value in ctx_fields.items():
            setattr(ctx, name, value)
        return self.dit(inp, ctx)

    def stats(self) -> CacheStats | None:
        return CacheStats.gather(self.states.values())

    def skipped(self) -> int:
        stats = self.stats()
        return 0 if stats is None else stats.skipped


def x_of(seed: int, batch: int = 1, tokens: int = 6, dim: int = 8) -> torch.Tensor:
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))


def drive(run: Run, inputs: list, branches=("cond",), **ctx_fields) -> tuple[str, list[torch.Tensor]]:
    """Every step's output, and C (computed) or S (skipped) per step."""
    marks, outs = "", []
    for step, inp in enumerate(inputs):
        before = run.skipped()
        outs.append(run(step, inp, branches, **ctx_fields))
        marks += "S" if run.skipped() > before else "C"
    return marks, outs


def pattern(run: Run, inputs: list, branches=("cond",), **ctx_fields) -> str:
    return drive(run, inputs, branches, **ctx_fields)[0]


def cached(dit, **keys):
    return apply_cache(dit, CacheConfig(**keys))


# -- configuration and flags --------------------------------------------------------------------

@pytest.mark.parametrize("keys, message", [
    (dict(method="fast"), "unknown cache method 'fast'"),
    (dict(method="first-block", threshold=-0.1), "threshold must be a number >= 0"),
    (dict(method="first-block", threshold=float("nan")), "threshold must be a number >= 0"),
    (dict(method="dual-block", fn=0), "fn must be an integer >= 1"),
    (dict(method="dual-block", bn=1.5), "bn must be an integer >= 0"),
    (dict(method="first-block", taylorseer_order=3), "taylorseer_order must be 0, 1 or 2"),
    (dict(method="teacache", fn=2), "fn/bn apply to dual-block"),
    (dict(threshold=0.1), "given without a cache method"),
    (dict(method="first-block", max_consecutive_cached_steps=0), "must be an integer >= 1"),
])
def test_bad_cache_settings_are_refused_in_one_line(keys, message):
    with pytest.raises(InvalidRequest, match=message) as err:
        CacheConfig(**keys)
    assert "\n" not in err.value.message


def test_python_cache_argument_forms():
    assert CacheConfig.from_mapping(None) == CacheConfig() == AccelConfig().cache
    assert CacheConfig.from_mapping("teacache") == CacheConfig(method="teacache")
    keys = dict(method="dual-block", threshold=0.12, fn=2, bn=1, taylorseer_order=1, warmup_steps=4,
                max_cached_steps=30)
    assert CacheConfig.from_mapping(keys) == CacheConfig(**keys)
    with pytest.raises(InvalidRequest, match="unknown cache key.*treshold"):
        CacheConfig.from_mapping(dict(method="first-block", treshold=0.1))
    with pytest.raises(InvalidRequest, match="cache must be a dict"):
        CacheConfig.from_mapping(0.1)


def test_cache_flags_become_a_cache_config():
    parser = argparse.ArgumentParser()
    add_cache_arguments(parser)
    assert cache_config_from_args(parser.parse_args([])) == CacheConfig()
    args = parser.parse_args(["--cache", "dual-block", "--cache-threshold", "0.1", "--cache-fn", "2", "--cache-bn",
                              "1", "--cache-warmup-steps", "3", "--cache-taylorseer-order", "2",
                              "--cache-max-cached-steps", "20", "--cache-max-consecutive-cached-steps", "4"])
    assert cache_config_from_args(args) == CacheConfig("dual-block", 0.1, 3, 2, 1, 2, 20, 4)
    with pytest.raises(InvalidRequest, match="unknown cache method 'magic'"):
        cache_config_from_args(parser.parse_args(["--cache", "magic"]))
    with pytest.raises(InvalidRequest, match="fn/bn apply to dual-block"):
        cache_config_from_args(parser.parse_args(["--cache", "first-block", "--cache-fn", "2"]))


def test_models_that_cannot_take_a_method_are_refused_in_one_line():
    with pytest.raises(InvalidRequest, match="fn 3 \\+ bn 1 must be below the model's 4 blocks"):
        cached(ToyDiT(), method="dual-block", fn=3, bn=1)
    with pytest.raises(InvalidRequest, match="fn 1 \\+ bn 0 must be below the model's 1 blocks"):
        cached(ToyDiT(kinds=("mix",)), method="first-block")
    no_fit = ToyDiT()
    no_fit.plan = replace(ToyDiT.plan, teacache=None)
    with pytest.raises(InvalidRequest, match="teacache has no published coefficients for this ToyDiT") as err:
        cached(no_fit, method="teacache")
    assert "\n" not in err.value.message


def test_method_defaults_resolve_against_the_model():
    from ditserve.accel.cache import resolve_policy

    for blocks, fn in ((4, 1), (12, 3), (57, 8)):  # dual-block: DBCache's 8 probe blocks, at most a quarter
        policy = resolve_policy(CacheConfig(method="dual-block"), ToyDiT(kinds=("mix",) * blocks))
        assert (policy.fn, policy.bn, policy.threshold, policy.warmup_steps) == (fn, 0, 0.08, 0)
    assert resolve_policy(CacheConfig(method="first-block", threshold=0.2), ToyDiT()).fn == 1
    tea = resolve_policy(CacheConfig(method="teacache", warmup_steps=3), ToyDiT())
    assert (tea.fn, tea.threshold, tea.warmup_steps, tea.coefficients) == (0, 0.3, 3, (1.0, 0.0))


def test_teacache_fits_per_family_and_checkpoint_shape():
    from ditserve.models.flux import FluxConfig
    from ditserve.models.flux.plan import FLUX_PLAN, FLUX_TEACACHE
    from ditserve.models.qwen_image.plan import QWEN_IMAGE_PLAN
    from ditserve.models.wan.config import WanConfig
    from ditserve.models.wan.plan import (WAN_PLAN, WAN_TEACACHE_1_3B, WAN_TEACACHE_14B_I2V, WAN_TEACACHE_14B_T2V,
                                          time_embedding, time_modulation)

    assert FLUX_PLAN.teacache(FluxConfig()) is FLUX_TEACACHE
    assert FLUX_TEACACHE.coefficients[0] == pytest.approx(498.651651)
    assert QWEN_IMAGE_PLAN.teacache is None  # none published: refused
    shapes = {(12, 16): WAN_TEACACHE_1_3B, (40, 16): WAN_TEACACHE_14B_T2V, (40, 36): WAN_TEACACHE_14B_I2V,
              (24, 48): None, (2, 16): None}  # (heads of 128, in_channels); TI2V-5B and tiny: no fit
    for (heads, channels), fit in shapes.items():
        assert WAN_PLAN.teacache(WanConfig(num_attention_heads=heads, in_channels=channels)) is fit
    assert WAN_TEACACHE_1_3B.signal is time_modulation and WAN_TEACACHE_14B_T2V.signal is time_embedding


# -- the segmented runner ------------------------------------------------------------------------

def test_segment_bounds_and_the_group_runner():
    dit = ToyDiT(kinds=("mix",) * 5)
    seg = SegmentedDiT(dit, graphs=False, bounds=(1, 4))
    assert [len(g) for g in seg.groups] == [1, 3, 1]
    for bad in ((0, 3), (3, 3), (2, 5)):
        with pytest.raises(ValueError, match="must rise strictly"):
            SegmentedDiT(dit, graphs=False, bounds=bad)
    inp = ToyInputs(x_of(0), torch.tensor([0.5]))
    seen = []
    seg.between = lambda h, k, ctx: seen.append(k) or h
    seg.run_groups = lambda h, groups, ctx: groups[2](groups[0](h))  # skip the middle
    out = seg(inp)
    assert seen == [0, 2]
    h = dit.embed(inp)
    for block in (dit.layers[0], dit.layers[4]):
        h = Hidden((block(h.streams[0], inp.t),), h.consts)
    assert torch.equal(out, h.streams[0])


# -- what each method decides and reuses ----------------------------------------------------------

@pytest.mark.parametrize("method", ["first-block", "dual-block", "teacache"])
def test_threshold_zero_skips_nothing_and_changes_no_bit(method):
    dit = ToyDiT()
    same = ToyInputs(x_of(0), torch.tensor([0.7]))  # identical every step: any positive threshold skips
    plain = dit(same)
    run = Run(cached(dit, method=method, threshold=0.0))
    for step in range(6):
        assert torch.equal(run(step, same), plain)
    assert run.stats() == CacheStats(method, forwards=6, skipped=0)
    eager = Run(cached(dit, method=method, threshold=0.5))
    assert pattern(eager, [same] * 6) != "CCCCCC"


def test_method_none_is_the_model_itself_and_no_context_runs_uncached():
    dit = ToyDiT()
    assert apply_cache(dit, CacheConfig()) is dit
    wrapped = cached(dit, method="first-block", threshold=10.0)
    inp = ToyInputs(x_of(1), torch.tensor([0.3]))
    assert torch.equal(wrapped(inp), dit(inp)) and torch.equal(wrapped(inp, None), dit(inp))
    assert step_cache(wrapped).totals.forwards == 0 and step_cache(dit) is None


def test_first_block_reuses_the_middle_residual_until_the_probe_moves_from_the_last_computed_step():
    dit = ToyDiT()
    xs = [x_of(0) + 0.04 * k * x_of(1) for k in range(3)]  # a steady drift

    @torch.no_grad()
    def probe(x):
        return dit.layers[0](x, None) - x

    def rel(a, b):
        return float((probe(a) - probe(b)).abs().sum() / probe(b).abs().sum())

    one, two = rel(xs[1], xs[0]), rel(xs[2], xs[0])
    assert one < two
    threshold = (one + two) / 2  # step 1 is close enough to step 0; step 2 is not (against step 0, not step 1)
    run = Run(cached(dit, method="first-block", threshold=threshold))
    inputs = [ToyInputs(x, torch.tensor([0.5])) for x in xs]
    outs = [run(i, inp) for i, inp in enumerate(inputs)]
    assert run.stats().skipped == 1
    first = lambda x: dit.layers[0](x, None)  # noqa: E731
    residual = dit(inputs[0]) - first(xs[0])  # the middle's update at step 0
    torch.testing.assert_close(outs[1], first(xs[1]) + residual, rtol=0, atol=1e-6)
    assert torch.equal(outs[2], dit(inputs[2]))
    assert not torch.allclose(outs[1], dit(inputs[1]), atol=1e-4)  # the reuse is visible


def test_dual_block_runs_first_fn_and_last_bn_blocks_and_honours_warmup_and_caps():
    dit = ToyDiT(kinds=("mix",) * 5)
    same = ToyInputs(x_of(2), torch.tensor([0.5]))
    run = Run(cached(dit, method="dual-block", threshold=0.5, fn=1, bn=1, warmup_steps=3))
    for block in dit.layers:
        block.calls = 0
    assert pattern(run, [same] * 5) == "CCCSS"
    assert [b.calls for b in dit.layers] == [5, 3, 3, 3, 5]
    torch.testing.assert_close(run(5, same), dit(same))  # same input: the reuse is exact up to rounding
    assert pattern(Run(cached(dit, method="dual-block", threshold=0.5, max_consecutive_cached_steps=2)),
                   [same] * 10) == "CSSCSSCSSC"
    assert pattern(Run(cached(dit, method="dual-block", threshold=0.5, max_cached_steps=3)),
                   [same] * 8) == "CSSSCCCC"


@pytest.mark.parametrize("kind, order", [("time", 1), ("time2", 2)])
def test_taylorseer_extrapolates_the_residual(kind, order):
    """A probe that never moves (const) and a middle whose update is a polynomial in t, linear in the
    step: TaylorSeer of that order reproduces the skipped steps; reusing the residual does not."""
    dit = ToyDiT(kinds=("const", kind, kind, kind))
    inputs = [ToyInputs(x_of(3), torch.tensor([1.0 + 0.1 * step])) for step in range(8)]
    with torch.no_grad():
        exact = [dit(inp) for inp in inputs]
    for taylor, close in ((order, True), (order - 1, False)):
        run = Run(cached(dit, method="first-block", threshold=0.5, taylorseer_order=taylor, warmup_steps=order + 1))
        outs = [run(step, inp) for step, inp in enumerate(inputs)]
        assert run.stats().skipped == 8 - (order + 1)
        err = max(float((o - e).abs().max()) for o, e in zip(outs, exact))
        assert (err < 1e-4) is close, (taylor, err)


def test_teacache_accumulates_the_rescaled_change_against_the_previous_step():
    """t = 1.0, 0.9, ...: changes 0.1, 0.111, 0.125, 0.143 of the previous step's signal. With
    threshold 0.3: step 1 (0.1) and 2 (0.211) reuse, 3 (0.336) computes and resets, 4 reuses, the last
    step computes. Measured against the last computed step instead, step 2 would compute."""
    dit = ToyDiT()
    inputs = [ToyInputs(x_of(4), torch.tensor([1.0 - 0.1 * step])) for step in range(6)]
    run = Run(cached(dit, method="teacache"), num_steps=6)
    assert pattern(run, inputs) == "CSSCSC"
    assert pattern(Run(cached(dit, method="teacache", threshold=0.35), num_steps=6), inputs) == "CSSSCC"


# -- state per branch, per sample, per rank --------------------------------------------------------

def test_cond_and_uncond_keep_their_own_cache_when_batched_and_are_counted_once():
    dit = ToyDiT()
    cond, uncond = x_of(5), x_of(6)
    inp = ToyInputs(torch.cat([cond, uncond]), torch.tensor([0.5, 0.5]))
    run = Run(cached(dit, method="first-block", threshold=0.5))
    first = run(0, inp, ("cond", "uncond"))
    again = run(1, inp, ("cond", "uncond"))
    assert run.stats() == CacheStats("first-block", forwards=2, skipped=1)
    torch.testing.assert_close(again, first, rtol=0, atol=1e-6)  # each chunk got its own residual back
    c, u = (run.states[b][STATE_KEY] for b in ("cond", "uncond"))
    assert c is not u and not torch.allclose(c.ladders[0][0], u.ladders[0][0])
    two_pass = Run(cached(dit, method="first-block", threshold=0.5))
    for step in range(2):
        two_pass(step, ToyInputs(cond, torch.tensor([0.5])), ("cond",))
        two_pass(step, ToyInputs(uncond, torch.tensor([0.5])), ("uncond",))
    assert two_pass.stats() == CacheStats("first-block", forwards=4, skipped=2)


def test_a_batch_computes_when_any_sample_needs_it_and_every_cache_stays_right():
    dit = ToyDiT()
    a, b = x_of(7), x_of(8)
    run = Run(cached(dit, method="first-block", threshold=0.05))
    steps = [torch.cat([a, b]), torch.cat([a, b + 0.5 * x_of(9)]), torch.cat([a, b + 0.5 * x_of(9)])]
    outs = [run(i, ToyInputs(x, torch.tensor([0.5, 0.5]))) for i, x in enumerate(steps)]
    assert run.stats().skipped == 1  # step 1: sample b moved, so a computed too; step 2: both still
    assert torch.equal(outs[1], dit(ToyInputs(steps[1], torch.tensor([0.5, 0.5]))))
    torch.testing.assert_close(outs[2], outs[1], rtol=0, atol=1e-6)  # step 1's fresh residuals, both samples


def test_samples_that_opt_out_make_their_batch_compute():
    dit = ToyDiT()
    same = ToyInputs(x_of(10, batch=2), torch.tensor([0.5, 0.5]))
    wrapped = cached(dit, method="first-block", threshold=0.5)
    assert pattern(Run(wrapped), [same] * 4, cache_enabled=(True, True)) == "CSSS"
    assert pattern(Run(wrapped), [same] * 4, cache_enabled=(True, False)) == "CCCC"
    off = Run(wrapped)
    pattern(off, [same] * 4, cache_enabled=(False, False))
    assert off.stats() is None and STATE_KEY not in off.states["cond"]  # no cache work at all


def test_stats_gather_into_the_timings():
    states = [{CACHE_STATS_KEY: CacheStats("teacache", 10, 4)}, {CACHE_STATS_KEY: CacheStats("teacache", 10, 6)}, {}]
    timings = Timings(cache=CacheStats.gather(states))
    assert timings.to_dict()["cache"] == {"method": "teacache", "forwards": 20, "skipped": 10}
    assert CacheStats.gather([{}, {}]) is None and "cache" not in Timings().to_dict()


DRIFT = [0.0, 1.0, 1.02, 2.5, 2.52, 2.54]  # big, small, big, small, small moves
# ranks that disagree would wait in mismatched collectives: fail after this instead of hanging
RANK_TIMEOUT = datetime.timedelta(seconds=90)


def _tiny_flux():
    from ditserve.models.flux import FluxConfig, FluxDiT

    torch.manual_seed(0)
    cfg = FluxConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    return FluxDiT(cfg).eval()


def _flux_steps(mode: str):
    """Six steps of FLUX inputs (one sample, or cond + uncond batched for "cfg") where only the second
    half of the image tokens (SP: rank 1's shard) or only uncond (CFG: rank 1's branch) moves."""
    from ditserve.models.flux.model import FluxInputs
    from ditserve.pipelines.flux import image_ids

    g = torch.Generator().manual_seed(1)
    img, move = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    txt, pooled = torch.randn(1, 4, 24, generator=g), torch.randn(1, 20, generator=g)
    ids = dict(img_ids=image_ids(4, 4, "cpu", torch.float32), txt_ids=torch.zeros(4, 3))
    if mode == "sp":
        move[:, :8] = 0
        return [FluxInputs(img=img + 0.3 * d * move, txt=txt, pooled=pooled, timesteps=torch.tensor([0.5]), **ids)
                for d in DRIFT], ("cond",)
    return [FluxInputs(img=torch.cat([img, img.flip(1) + 0.3 * d * move]), txt=torch.cat([txt, txt.flip(1)]),
                       pooled=torch.cat([pooled, -pooled]), timesteps=torch.full((2,), 0.5), **ids)
            for d in DRIFT], ("cond", "uncond")


def _flux_rank(rank: int, store: str, cases: list, work: str):
    """One rank of real 2-rank FLUX runs, one per case (mode, keys), on one gloo group: Ulysses-sharded
    (the parallel package's wrapper under the cache) or one CFG branch per rank; the cache reduces over
    the SP group, agrees over the control group."""
    import torch.distributed as dist

    from ditserve.config import ParallelConfig
    from ditserve.parallel.groups import init_groups
    from ditserve.parallel.sequence import apply_sequence_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=RANK_TIMEOUT)
    for index, (mode, keys) in enumerate(cases):
        sp = mode == "sp"
        groups = init_groups(ParallelConfig(num_gpus=2, ulysses_degree=2 if sp else 1, cfg_parallel=not sp),
                             torch.device("cpu"))
        dit = apply_sequence_parallel(_tiny_flux(), groups)
        model = apply_cache(dit, CacheConfig(**keys), sp_group=groups.sp.group, sync_group=groups.control)
        inputs, branches = _flux_steps(mode)
        if not sp:  # this rank's branch: the cond or the uncond half of each step's batch
            inputs = [replace(inp, img=inp.img[rank:rank + 1], txt=inp.txt[rank:rank + 1],
                              pooled=inp.pooled[rank:rank + 1], timesteps=inp.timesteps[rank:rank + 1])
                      for inp in inputs]
            branches = (branches[rank],)
        decided, results = drive(Run(model), inputs, branches)
        torch.save({"pattern": decided, "outs": results}, f"{work}/case{index}.rank{rank}.pt")
    dist.destroy_process_group()


FLUX_RANK_CASES = [
    ("sp", dict(method="first-block", threshold=0.1)),
    ("sp", dict(method="teacache", threshold=0.5)),
    ("cfg", dict(method="dual-block", threshold=0.1, taylorseer_order=1)),
]


@pytest.fixture(scope="module")
def flux_rank_results(tmp_path_factory):
    """Each case's [rank 0, rank 1] results, from one spawn of two ranks for all cases."""
    import torch.multiprocessing as mp

    work = tmp_path_factory.mktemp("flux_cache_ranks")
    mp.spawn(_flux_rank, args=(str(work / "store"), FLUX_RANK_CASES, str(work)), nprocs=2, join=True)
    return [[torch.load(work / f"case{i}.rank{r}.pt") for r in range(2)] for i in range(len(FLUX_RANK_CASES))]


@pytest.mark.parametrize("case", range(len(FLUX_RANK_CASES)),
                         ids=[f"{m}-keys{i}" for i, (m, _) in enumerate(FLUX_RANK_CASES)])
def test_flux_sequence_and_cfg_parallel_ranks_cache_as_one_process(case, flux_rank_results):
    """FLUX over two gloo ranks with the parallel package's wrappers: every rank takes the decisions of
    one process running the whole batch and gives its outputs, though rank 0's own tokens or branch
    never move (alone, it would skip more)."""
    mode, keys = FLUX_RANK_CASES[case]
    with torch.no_grad():
        expected, full = drive(Run(cached(_tiny_flux(), **keys)), *_flux_steps(mode))
        inputs, branches = _flux_steps(mode)
        still = [replace(inputs[0], img=inputs[0].img[:1], txt=inputs[0].txt[:1], pooled=inputs[0].pooled[:1],
                         timesteps=inputs[0].timesteps[:1])] * len(inputs)
        alone = pattern(Run(cached(_tiny_flux(), **keys)), still)
    assert "S" in expected[1:] and "C" in expected[1:] and alone != expected, (expected, alone)
    results = flux_rank_results[case]
    assert [r["pattern"] for r in results] == [expected, expected]
    for step, ref in enumerate(full):
        for r in range(2):
            part = ref if mode == "sp" else ref[r:r + 1]
            torch.testing.assert_close(results[r]["outs"][step], part, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="segment CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["first-block", "dual-block", "teacache"])
def test_segment_graphs_replay_the_cached_paths_as_eager_code_runs_them(method):
    """On CUDA: graphs per segment (whose outputs are reused buffers) give the eager cache's decisions
    and outputs; nothing the cache keeps is overwritten by the next replay."""
    from ditserve.models.flux import FluxConfig, FluxDiT
    from ditserve.models.flux.model import FluxInputs

    torch.manual_seed(0)
    cfg = FluxConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    dit = FluxDiT(cfg).cuda().eval()
    g = torch.Generator().manual_seed(1)
    img, move = torch.randn(2, 16, 16, generator=g), torch.randn(2, 16, 16, generator=g)
    steps = [img, img, img + move, img + move, img + move]
    inputs = [FluxInputs(img=x.cuda(), txt=torch.randn(2, 4, 24, generator=g).cuda(),
                         pooled=torch.ones(2, 20).cuda(), timesteps=torch.full((2,), 0.5).cuda(),
                         img_ids=torch.zeros(16, 3).cuda(), txt_ids=torch.zeros(4, 3).cuda()) for x in steps]
    with torch.no_grad():
        eager, graphed = (drive(Run(apply_cache(dit, CacheConfig(method=method, threshold=0.3), graphs=graphs)), inputs)
                          for graphs in (False, True))
    assert eager[0] == graphed[0] and "S" in eager[0] and "C" in eager[0][1:], (eager[0], graphed[0])
    for a, b in zip(eager[1], graphed[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# -- through the pipelines -----------------------------------------------------------------------

def _cache_engine(engine, keys: dict | None):
    """Wrap every DiT of a loaded engine's pipeline with the cache (what accelerate_dit will do)."""
    pipeline = engine.pipeline
    if not hasattr(pipeline, "_plain_dits"):
        pipeline._plain_dits = {n: getattr(pipeline, n) for n in pipeline.dit_names if getattr(pipeline, n, None)}
    for name, dit in pipeline._plain_dits.items():
        setattr(pipeline, name, dit if keys is None else apply_cache(dit, CacheConfig(**keys)))
    return [step_cache(getattr(pipeline, n)) for n in pipeline._plain_dits]


def _totals(caches) -> tuple[int, int]:
    return sum(c.totals.forwards for c in caches), sum(c.totals.skipped for c in caches)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(float) - b.astype(float)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


@pytest.fixture(scope="module")
def demo_engine():
    from ditserve import demo
    from ditserve.config import EngineConfig, ModelConfig
    from ditserve.runtime.engine import Engine

    return Engine.from_config(EngineConfig(ModelConfig(str(demo.model_path()), "cpu", "float32")))


def _demo_images(engine, keys, steps=20):
    from ditserve.api import GenerationRequest

    caches = _cache_engine(engine, keys)
    out = engine.generate(GenerationRequest(prompt="a red circle on the left, blue background", seed=5,
                                            num_inference_steps=steps, num_images=2))
    return np.stack([np.asarray(im) for im in out.images]), caches


@pytest.mark.parametrize("keys", [dict(method="first-block", threshold=0.1),
                                  pytest.param(dict(method="dual-block", threshold=0.15, bn=1, warmup_steps=2,
                                                    taylorseer_order=1), marks=pytest.mark.slow),
                                  dict(method="teacache", threshold=0.4)])
def test_demo_model_caches_with_little_visible_change(demo_engine, keys):
    """The trained FLUX-architecture demo: a third or more of the forwards skipped at these settings,
    the images within 30 dB of the uncached ones; at threshold 0, bit-identical."""
    plain, _ = _demo_images(demo_engine, None)
    zero, caches = _demo_images(demo_engine, {**keys, "threshold": 0.0})
    assert np.array_equal(zero, plain) and _totals(caches) == (20, 0)
    images, caches = _demo_images(demo_engine, keys)
    forwards, skipped = _totals(caches)
    assert forwards == 20 and skipped >= 7, skipped
    assert 30 < _psnr(images, plain) < math.inf
    _cache_engine(demo_engine, None)


def test_fp8_linears_under_the_cache():
    from ditserve.accel.fp8 import FP8Linear, apply_fp8
    from ditserve.models.flux import FluxConfig, FluxDiT
    from ditserve.models.flux.model import FluxInputs

    torch.manual_seed(0)
    cfg = FluxConfig(in_channels=16, num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=16,
                     joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    dit = apply_fp8(FluxDiT(cfg).eval().to(torch.bfloat16), min_features=256)
    assert any(isinstance(m, FP8Linear) for m in dit.modules())
    g = torch.Generator().manual_seed(1)
    inp = FluxInputs(img=torch.randn(1, 6, 16, generator=g).bfloat16(), txt=torch.randn(1, 4, 24, generator=g).bfloat16(),
                     pooled=torch.randn(1, 20, generator=g).bfloat16(), timesteps=torch.tensor([0.5]),
                     img_ids=torch.zeros(6, 3), txt_ids=torch.zeros(4, 3))
    with torch.no_grad():
        plain = dit(inp)
        for method in ("first-block", "dual-block", "teacache"):
            run = Run(cached(dit, method=method, threshold=0.5))
            outs = [run(step, inp) for step in range(3)]
            assert run.stats().skipped >= 1 and torch.equal(outs[0], plain)
            assert torch.isfinite(outs[-1].float()).all()


@pytest.fixture(scope="module")
def qwen_engine(tiny_qwen_image):
    from ditserve.config import EngineConfig, ModelConfig
    from ditserve.runtime.engine import Engine

    return Engine.from_config(EngineConfig(ModelConfig(str(tiny_qwen_image), "cpu", "float32")))


def test_qwen_image_with_true_cfg_caches_and_refuses_teacache(qwen_engine):
    from ditserve.api import GenerationRequest

    req = GenerationRequest(prompt="three owls", negative_prompt="blurry", height=32, width=32, num_inference_steps=6,
                            true_cfg_scale=4.0, seed=3)
    _cache_engine(qwen_engine, None)
    plain = np.asarray(qwen_engine.generate(req).images[0])
    for keys in (dict(method="first-block"), dict(method="dual-block", warmup_steps=2, taylorseer_order=1)):
        caches = _cache_engine(qwen_engine, {**keys, "threshold": 0.0})
        assert np.array_equal(np.asarray(qwen_engine.generate(req).images[0]), plain)
        caches = _cache_engine(qwen_engine, {**keys, "threshold": 2.0})  # random weights move a lot
        image = np.asarray(qwen_engine.generate(req).images[0])
        assert _totals(caches)[0] == 6 and _totals(caches)[1] >= 1  # CFG batched: one forward per step
        assert not np.array_equal(image, plain)
    with pytest.raises(InvalidRequest, match="teacache has no published coefficients for this QwenImageDiT"):
        _cache_engine(qwen_engine, dict(method="teacache"))
    _cache_engine(qwen_engine, None)


def test_wan_experts_and_cfg_cache_and_teacache_reads_the_time_signal(tiny_wan, monkeypatch):
    """Wan 2.2 A14B-shaped: both experts cached, each with its own state; teacache over the time
    modulation (the tiny shape has no published fit, so one is lent for the test)."""
    from ditserve.api import GenerationRequest
    from ditserve.config import EngineConfig, ModelConfig
    from ditserve.models.wan.model import WanDiT
    from ditserve.models.wan.plan import WAN_PLAN, WAN_TEACACHE_1_3B, time_modulation
    from ditserve.runtime.engine import Engine

    engine = Engine.from_config(EngineConfig(ModelConfig(str(tiny_wan("a14b")), "cpu", "float32")))
    req = GenerationRequest(prompt="a cat", negative_prompt="blurry", height=32, width=48, num_frames=5,
                            num_inference_steps=6, guidance_scale=4.0, guidance_scale_2=2.0, seed=0, fps=16)
    plain = engine.generate(req).videos[0]
    with pytest.raises(InvalidRequest, match="teacache has no published coefficients for this WanDiT"):
        _cache_engine(engine, dict(method="teacache"))
    for keys in (dict(method="first-block"), dict(method="dual-block", taylorseer_order=2)):
        caches = _cache_engine(engine, {**keys, "threshold": 0.0})
        assert np.array_equal(engine.generate(req).videos[0], plain)
        caches = _cache_engine(engine, {**keys, "threshold": 2.0})
        video = engine.generate(req).videos[0]
        assert [c.totals.forwards for c in caches] == [2, 4]  # steps per expert at the boundary, CFG batched
        assert all(c.totals.skipped >= 1 for c in caches) and not np.array_equal(video, plain)
    shapes = []

    def spy(dit, h):
        signal = time_modulation(dit, h)
        shapes.append(tuple(signal.shape))
        return signal

    monkeypatch.setattr(WanDiT, "plan", replace(WAN_PLAN, teacache=lambda cfg: replace(WAN_TEACACHE_1_3B, signal=spy)))
    caches = _cache_engine(engine, dict(method="teacache", threshold=10.0, warmup_steps=1))
    engine.generate(req)
    dim = engine.pipeline.dit.cfg.hidden_size
    assert set(shapes) == {(2, 6, dim)}  # cond and uncond batched: the six time-modulation vectors
    assert all(c.totals.skipped >= 1 for c in caches)
    _cache_engine(engine, None)
