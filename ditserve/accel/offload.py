"""Fit big models into GPU memory, applied to a loaded pipeline from outside (`apply_memory`):

- `model` offload: every component (text encoders, each DiT — both Wan experts —, VAE, image
  encoder) keeps its weights in host memory (pinned on CUDA) and is copied to the execution device
  only while a stage that uses it runs; a DiT comes over when it is called, so the other Wan expert
  waits on the host. The pipeline's stage methods and each DiT's call are wrapped; nothing in the
  pipeline changes.
- `layerwise` offload: `model`, and each DiT's blocks (`dit.blocks`, from its plan's block lists)
  stream from host memory in groups of `offload_group_size`: group k is on the device before its
  first block runs, group k + 1 (after the last, the first again, for the next step) is copied on a
  side CUDA stream while group k computes, and group k's device copies are dropped after its last
  block. With `gpu_memory_budget_gib`, the first blocks stay resident as far as the budget allows
  and only the rest stream; what the budget keeps free for activations is estimated at the DiT's
  first call, for that call's inputs (accel/activations.py, on a meta copy), until then every block
  streams. Block calls are wrapped around a compiled block's compiled call, so the
  streaming itself is never traced.
- the text encoders on the CPU (`text_encoder_device="cpu"`): their outputs move to the device.
- the VAE's tiling and slicing (vae/memory.py).
- forward chunking of each DiT's per-token parts (`forward_chunk_size`, accel/activations.py).

Offloading moves weights by swapping each parameter's `.data` (and each buffer) between its host
copy and a device copy, so modules keep their identity and anything holding them (step caches,
parallel wrappers) still works. CUDA graphs bake weight addresses in, so the engine turns them off
under offload (`offload_accel`). On a machine without CUDA, "device" and "host" are both the CPU:
the copies are still made and dropped, so the mechanics run and the output is bit-identical.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from torch import nn

from ditserve.api import InvalidRequest
from ditserve.config import AccelConfig
from ditserve.config.memory import MemoryConfig

log = logging.getLogger(__name__)

GIB = 2**30
# Budget kept free for activations and the allocator's slack (layerwise with a budget): a DiT step
# at 1024² (FLUX) needs well under a GiB; a 720p x 81 Wan step a few. Not yet measured per model.
ACTIVATION_RESERVE_GIB = 2.0
# An activation estimate (accel/activations.py) counts tensors, not the allocator's rounding and caching
# or kernel workspaces: what a budget keeps free for it is this much more.
ESTIMATE_MARGIN, ESTIMATE_SLACK_GIB = 1.05, 0.25
TEXT_PREFIX = "text_encoder"  # diffusers' component names: text_encoder, text_encoder_2, ...
STAGE_PARTS = {  # what each stage method uses, by component name; denoise: the DiTs, loaded on call
    "run": (TEXT_PREFIX,),  # a pipeline may caption with its text encoder before the stages
    "encode_prompt": (TEXT_PREFIX,),
    "prepare_latents": ("vae", "image_encoder"),  # when a request has input images (else nothing)
    "denoise": (),
    "decode": ("vae",),
}


def load_device(memory: MemoryConfig, device: torch.device) -> torch.device:
    """Where the pipeline loads: the host when anything is to live there (the weights then never
    pass through the GPU whole), else the execution device."""
    return torch.device("cpu") if memory.offload or memory.text_encoder_device == "cpu" else device


def check_memory(memory: MemoryConfig, parallel_enabled: bool) -> None:
    """Refuse, in one line before anything loads, what is not built yet: offload and the CPU text
    encoder under the parallel engine (its ranks load and shard on their GPUs)."""
    if parallel_enabled and (memory.offload or memory.text_encoder_device == "cpu"):
        flag = f"--cpu-offload {memory.cpu_offload}" if memory.offload else "--text-encoder-device cpu"
        raise InvalidRequest(f"{flag} does not work with several GPUs yet; use one GPU, or the parallel engine "
                             "without it", "cpu_offload")


def offload_accel(accel: AccelConfig, memory: MemoryConfig) -> AccelConfig:
    """The speed transforms that compose with offload: no CUDA graphs (they keep weight addresses)."""
    if memory.offload and accel.cuda_graphs:
        log.info("--cpu-offload %s: CUDA graphs off (weights move between steps)", memory.cpu_offload)
        return replace(accel, cuda_graphs=False)
    return accel


def nbytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the parameters and buffers of `modules`, each tensor once."""
    seen, total = set(), 0
    for mod in modules:
        for t in (*mod.parameters(), *mod.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


class HostCopy:
    """The tensors of some modules (parameters and buffers, each once, minus `exclude`) with a host
    copy of each, pinned on CUDA, so they go to the device and back without new host memory."""

    def __init__(self, modules: Iterable[nn.Module], pin: bool, exclude: frozenset[int] = frozenset()):
        self.params: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.buffers: list[tuple[list[tuple[nn.Module, str]], torch.Tensor]] = []
        seen: dict[int, list] = {}
        for mod in modules:
            for m in mod.modules():
                for p in m._parameters.values():
                    if p is not None and id(p) not in exclude and id(p) not in seen:
                        seen[id(p)] = []
                        p.data = _host(p.data, pin)
                        self.params.append((p, p.data))
                for name, b in m._buffers.items():
                    if b is None or id(b) in exclude:
                        continue
                    if id(b) in seen:
                        seen[id(b)].append((m, name))
                        continue
                    owners = seen[id(b)] = [(m, name)]
                    host = _host(b, pin)
                    m._buffers[name] = host
                    self.buffers.append((owners, host))
        self.nbytes = sum(h.numel() * h.element_size() for _, h in self.params)
        self.nbytes += sum(h.numel() * h.element_size() for _, h in self.buffers)

    def tensor_ids(self) -> set[int]:
        return {id(p) for p, _ in self.params} | {id(m._buffers[n]) for owners, _ in self.buffers for m, n in owners}

    def to_device(self, device: torch.device) -> list[torch.Tensor]:
        """Copy everything to `device` (asynchronously from pinned memory on CUDA; a real copy on the
        CPU too, so that the mechanics run there); returns the device tensors."""
        out = []
        for p, host in self.params:
            p.data = host.to(device, non_blocking=True, copy=True)
            out.append(p.data)
        for owners, host in self.buffers:
            t = host.to(device, non_blocking=True, copy=True)
            for m, name in owners:
                m._buffers[name] = t
            out.append(t)
        return out

    def to_host(self) -> None:
        """Point everything back at the host copies; the device copies are freed."""
        for p, host in self.params:
            p.data = host
        for owners, host in self.buffers:
            for m, name in owners:
                m._buffers[name] = host


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.detach().to("cpu")
    return t.pin_memory() if pin and not t.is_pinned() else t


def wrap_call(block: nn.Module, before: Callable[[], None] | None,
              after: Callable[[], None] | None) -> Callable[[], None]:
    """Run `before` and `after` around each call of `block`, outside any compiled code: around the
    compiled call of a block compiled in place (`nn.Module.compile`), else as forward hooks.
    Returns what undoes it."""
    compiled = getattr(block, "_compiled_call_impl", None)
    if compiled is not None:
        def call(*args, **kwargs):
            if before is not None:
                before()
            out = compiled(*args, **kwargs)
            if after is not None:
                after()
            return out
        block._compiled_call_impl = call
        return lambda: setattr(block, "_compiled_call_impl", compiled)
    handles = []
    if before is not None:
        handles.append(block.register_forward_pre_hook(lambda _m, _a: before()))
    if after is not None:
        handles.append(block.register_forward_hook(lambda _m, _a, _o: after()))
    return lambda: [h.remove() for h in handles]


class BlockStreamer:
    """Streams groups of blocks from host memory: fetch before the group's first block (already
    there when prefetched), prefetch the next group on a side stream, drop after the last block.
    At most two groups are on the device at a time."""

    def __init__(self, groups: list[list[nn.Module]], device: torch.device, pin: bool):
        self.device = device
        self.blocks = sum(len(g) for g in groups)  # how many blocks stream
        self.copies = [HostCopy(g, pin) for g in groups]
        self.loaded: dict[int, tuple[torch.cuda.Event | None, list[torch.Tensor]]] = {}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.transfers = 0  # groups copied to the device (tests and logs)
        self.undo = []
        for k, group in enumerate(groups):
            enter, leave = functools.partial(self.enter, k), functools.partial(self.leave, k)
            if len(group) == 1:
                self.undo.append(wrap_call(group[0], enter, leave))
            else:
                self.undo.append(wrap_call(group[0], enter, None))
                self.undo.append(wrap_call(group[-1], None, leave))

    def remove(self) -> None:
        """Stop streaming: the blocks stay on the host copies, called as before (benchmarks)."""
        self.drop_all()
        for undo in self.undo:
            undo()
        self.undo = []

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.copies)

    def _next(self, k: int) -> int:
        return (k + 1) % len(self.copies)

    def enter(self, k: int) -> None:
        nxt = self._next(k)
        for j in [j for j in self.loaded if j not in (k, nxt)]:  # a step cache skipped them
            self.drop(j)
        self.fetch(k)
        event, tensors = self.loaded[k]
        if event is not None:  # prefetched on the side stream: compute waits for the copy only
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors:  # freed after the compute stream is done with them, not before
                t.record_stream(current)
            self.loaded[k] = (None, tensors)
        if nxt != k:
            self.fetch(nxt)

    def leave(self, k: int) -> None:
        if self._next(k) != k:
            self.drop(k)

    def fetch(self, k: int) -> None:
        if k in self.loaded:
            return
        self.transfers += 1
        if self.stream is None:
            self.loaded[k] = (None, self.copies[k].to_device(self.device))
            return
        with torch.cuda.stream(self.stream):
            tensors = self.copies[k].to_device(self.device)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.loaded[k] = (event, tensors)

    def drop(self, k: int) -> None:
        if self.loaded.pop(k, None) is not None:
            self.copies[k].to_host()

    def drop_all(self) -> None:
        for k in list(self.loaded):
            self.drop(k)


def plan_streaming(blocks: list[nn.Module], group_size: int, budget_bytes: int | None,
                   fixed_bytes: int, reserve_bytes: int | None = None) -> tuple[list[nn.Module], list[list[nn.Module]]]:
    """(resident blocks, streamed groups): without a budget every block streams; with one, the first
    blocks stay resident while they fit `budget - fixed - reserve - two streamed groups` (`reserve`:
    the activations' peak, e.g. from accel/activations.py's estimate; default ACTIVATION_RESERVE_GIB)."""
    sizes = [nbytes([b]) for b in blocks]
    keep = 0
    if budget_bytes is not None:
        reserve = ACTIVATION_RESERVE_GIB * GIB if reserve_bytes is None else reserve_bytes
        room = budget_bytes - fixed_bytes - reserve
        for k in range(len(blocks) + 1):
            rest = sizes[k:]
            window = 2 * max((sum(rest[i:i + group_size]) for i in range(0, len(rest), group_size)), default=0)
            if sum(sizes[:k]) + window <= room:
                keep = k
    streamed = blocks[keep:]
    return blocks[:keep], [streamed[i:i + group_size] for i in range(0, len(streamed), group_size)]


def reserve_for(estimate_gib: float) -> float:
    """GiB a budget keeps free for activations estimated at `estimate_gib`."""
    return estimate_gib * ESTIMATE_MARGIN + ESTIMATE_SLACK_GIB


def resident_blocks(dit: nn.Module, group_size: int, budget_gib: float, activation_gib: float) -> int:
    """How many of `dit`'s blocks a `budget_gib` plan keeps resident beside activations of `activation_gib`."""
    blocks = list(dit.blocks)
    resident, _ = plan_streaming(blocks, group_size, int(budget_gib * GIB), nbytes([dit]) - nbytes(blocks),
                                 int(reserve_for(activation_gib) * GIB))
    return len(resident)


def stream_blocks(dit: nn.Module, device: torch.device, group_size: int = 1, budget_gib: float | None = None,
                  name: str = "dit", activation_gib: float | None = None) -> BlockStreamer | None:
    """Stream `dit`'s blocks (on the host) in groups of `group_size`, keeping the first ones resident
    as far as `budget_gib` allows with room for activations estimated at `activation_gib`
    (`reserve_for`; default ACTIVATION_RESERVE_GIB); None when every block fits. The rest of the DiT is
    the caller's to place (an Offloader's HostCopy, or `.to(device)`)."""
    blocks = list(dit.blocks)
    budget = None if budget_gib is None else int(budget_gib * GIB)
    reserve = None if activation_gib is None else int(reserve_for(activation_gib) * GIB)
    resident, groups = plan_streaming(blocks, group_size, budget, nbytes([dit]) - nbytes(blocks), reserve)
    streamer = BlockStreamer(groups, device, device.type == "cuda") if groups else None
    log.info("%s: %d blocks resident, %d streamed in %d groups (%.2f GiB streamed per call)", name,
             len(resident), len(blocks) - len(resident), len(groups), streamer.nbytes / GIB if streamer else 0.0)
    return streamer


class Offloader:
    """Which components are on the device; `ensure(names)` brings those over and sends the others
    back to the host. A DiT under layerwise offload brings over only its resident part; its
    streamer moves the rest."""

    def __init__(self, parts: dict[str, nn.Module], device: torch.device, pin: bool,
                 streamers: dict[str, BlockStreamer]):
        self.device = device
        self.pin = pin
        self.parts = parts
        self.streamers = streamers
        self.copies = {name: self._copy(name) for name in parts}
        self.resident: set[str] = set()
        self.loads = 0  # components copied to the device (tests and logs)
        self.activation_gib: dict[str, float] = {}  # per DiT: the estimate its budget plan kept free

    def _copy(self, name: str) -> HostCopy:
        streamer = self.streamers.get(name)
        skip = frozenset(i for c in streamer.copies for i in c.tensor_ids()) if streamer else frozenset()
        return HostCopy([self.parts[name]], self.pin, skip)

    def replan(self, name: str, streamer: BlockStreamer | None) -> None:
        """Stream component `name`'s blocks with `streamer` from now on (None: none stream)."""
        if name in self.resident:
            self.copies[name].to_host()
            self.resident.discard(name)
        old = self.streamers.pop(name, None)
        if old is not None:
            old.remove()
        if streamer is not None:
            self.streamers[name] = streamer
        self.copies[name] = self._copy(name)

    def ensure(self, names: Iterable[str]) -> None:
        wanted = {n for n in names if n in self.copies}
        for name in sorted(self.resident - wanted):
            self.copies[name].to_host()
            if name in self.streamers:
                self.streamers[name].drop_all()
            self.resident.discard(name)
        for name in sorted(wanted - self.resident):
            self.copies[name].to_device(self.device)
            self.resident.add(name)
            self.loads += 1

    def matching(self, prefixes: tuple[str, ...]) -> list[str]:
        return [n for n in self.copies if n.startswith(prefixes)]


def to_device(value, device: torch.device):
    """`value` (a tensor, or dataclasses, tuples, lists and dicts of them) with its tensors on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _wrap_stage(pipeline, stage: str, before: Callable[..., None], after: Callable | None = None,
                takes_args: int = 0) -> None:
    """`pipeline.<stage>` (an instance attribute from now on) runs `before(first takes_args arguments)`
    first and returns `after(its result)`."""
    method = getattr(pipeline, stage)

    @functools.wraps(method)
    def run(*args, **kwargs):
        before(*args[:takes_args])
        out = method(*args, **kwargs)
        return after(out) if after is not None else out

    setattr(pipeline, stage, run)


def apply_memory(pipeline, memory: MemoryConfig, device: torch.device,
                 activation_gib: float | None = None) -> Offloader | None:
    """Place the loaded `pipeline`'s components as `memory` says (loaded where `load_device` put
    them), for running on `device`; returns the Offloader when offloading (None otherwise).
    `activation_gib`: the DiT call's activation peak to keep free under a budget (default
    ACTIVATION_RESERVE_GIB; benchmarks pass accel/activations.py's estimate for their size)."""
    from ditserve.accel.activations import apply_forward_chunking, forward_chunk_size
    from ditserve.vae.memory import apply_vae_memory

    pipeline.device = device
    chunk = forward_chunk_size(memory.forward_chunk_size, memory.cpu_offload)
    if chunk:
        for attr in pipeline.dit_names:
            if getattr(pipeline, attr, None) is not None:
                apply_forward_chunking(getattr(pipeline, attr), chunk)
    parts = {}
    for name, module in pipeline.components().items():
        if module is not None and all(module is not m for m in parts.values()):
            parts[name] = module
    on_cpu = {n for n in parts if memory.text_encoder_device == "cpu" and n.startswith(TEXT_PREFIX)}
    for name in on_cpu:
        parts[name].to("cpu")
    if on_cpu and device.type != "cpu":
        _wrap_stage(pipeline, "encode_prompt", lambda: None, lambda out: to_device(out, device))
        log.info("text encoders %s run on the CPU", sorted(on_cpu))
    vae = parts.get("vae")
    if isinstance(vae, nn.Module) and load_device(memory, device).type == "cpu" and device.type != "cpu":
        # the video families load their VAE in float32 on the CPU, in the pipeline dtype elsewhere
        if next(vae.parameters()).dtype == torch.float32 and pipeline.dtype != torch.float32:
            vae.to(pipeline.dtype)
    if vae is not None and hasattr(vae, "use_tiling"):
        apply_vae_memory(vae, memory.vae_tiling, memory.vae_slicing, memory.vae_tile_size)
    managed = {n: m for n, m in parts.items() if n not in on_cpu}
    if not memory.offload:
        for module in managed.values():
            module.to(device)
        return None
    pipeline.offloader = _offload(pipeline, managed, memory, device, activation_gib)
    return pipeline.offloader


def _offload(pipeline, parts: dict[str, nn.Module], memory: MemoryConfig, device: torch.device,
             activation_gib: float | None = None) -> Offloader:
    pin = device.type == "cuda"
    dits = {}
    for attr in pipeline.dit_names:
        dit = getattr(pipeline, attr, None)
        name = next((n for n, m in parts.items() if m is dit), None) if dit is not None else None
        if name is not None:
            dits[name] = dit
    streamers = {}
    budget = memory.gpu_memory_budget_gib
    later = memory.cpu_offload == "layerwise" and budget is not None and activation_gib is None
    if memory.cpu_offload == "layerwise":
        for name, dit in dits.items():  # a budget without a given estimate: all stream until the first call
            streamer = stream_blocks(dit, device, memory.offload_group_size, None if later else budget, name,
                                     activation_gib)
            if streamer is not None:
                streamers[name] = streamer
    offloader = Offloader(parts, device, pin, streamers)
    for stage, uses in STAGE_PARTS.items():
        if hasattr(pipeline, stage) and stage != "prepare_latents":
            _wrap_stage(pipeline, stage, functools.partial(offloader.ensure, offloader.matching(uses)))
    # latents need the VAE (and an image encoder) only to encode input images
    _wrap_stage(pipeline, "prepare_latents", lambda requests: offloader.ensure(
        offloader.matching(STAGE_PARTS["prepare_latents"] if any(r.images for r in requests) else ())),
                takes_args=1)
    whole_if_fits = memory.cpu_offload == "layerwise" and budget is None and memory.forward_chunk_size is None
    for name, dit in dits.items():
        if later:  # the budget's plan, once the first call shows the activations' size
            _plan_at_first_call(offloader, name, dit, memory, device)
        # a DiT comes over when called; the other expert goes back
        dit.register_forward_pre_hook(lambda _m, _a, name=name: offloader.ensure([name]))
        if whole_if_fits:  # after ensure: what is free then is what the call has
            _unchunk_if_it_fits(name, dit, memory, device)
    log.info("--cpu-offload %s: %.2f GiB of weights in %s host memory", memory.cpu_offload,
             (sum(c.nbytes for c in offloader.copies.values()) + sum(s.nbytes for s in streamers.values())) / GIB,
             "pinned" if pin else "CPU")
    return offloader


def free_device_gib(device: torch.device) -> float:
    """Memory a call on `device` can still take: CUDA's free memory plus what the caching allocator
    holds unused; elsewhere the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) / GIB
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB


def _unchunked_gib(dit: nn.Module, chunk: int, args: tuple, kwargs: dict) -> float:
    """The activation peak (GiB) of the call `dit(*args, **kwargs)` without forward chunking; `dit` keeps
    its `chunk` afterwards, whatever happens."""
    from ditserve.accel.activations import apply_forward_chunking, disable_forward_chunking, estimate_call

    disable_forward_chunking(dit)
    try:
        return estimate_call(dit, args, kwargs).peak_bytes / GIB
    finally:
        apply_forward_chunking(dit, chunk)


def _unchunk_if_it_fits(name: str, dit: nn.Module, memory: MemoryConfig, device: torch.device) -> None:
    """Layerwise offload without a budget streams every block and chunks the per-token parts by default;
    at `dit`'s first call the chunk goes when that call's unchunked activations (estimated, with the
    budget's margin) and two streamed groups fit what the device has free. Chunking costs 4-11 % of a
    Wan2.1-1.3B 480p step (H200, 2026-12-04: all streamed 0.635 s chunked, 0.603 s whole, eager)."""
    from ditserve.accel.activations import chunk_of, disable_forward_chunking

    handle = None

    def check(_module, args, kwargs):
        handle.remove()
        chunk = chunk_of(dit)
        if not chunk:
            return
        try:
            whole = _unchunked_gib(dit, chunk, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - the estimate is an aid: keep the smaller peak
            log.warning("%s: no activation estimate (%s: %s); forward chunking stays", name, type(exc).__name__, exc)
            return
        window = 2 * memory.offload_group_size * max(nbytes([b]) for b in dit.blocks) / GIB
        free = free_device_gib(device)
        if reserve_for(whole) + window <= free:
            disable_forward_chunking(dit)
            log.info("%s: unchunked activations (%.2f GiB) fit the %.1f GiB free: forward chunking off", name,
                     whole, free)
        else:
            log.info("%s: unchunked activations (%.2f GiB) do not fit the %.1f GiB free: forward chunks of %d "
                     "tokens", name, whole, free, chunk)

    handle = dit.register_forward_pre_hook(check, with_kwargs=True)


def _plan_at_first_call(offloader: Offloader, name: str, dit: nn.Module, memory: MemoryConfig,
                        device: torch.device) -> None:
    """At `dit`'s first call, estimate that call's activation peak (accel/activations.py) and keep as
    many blocks resident as the budget allows beside it; the estimate is for the first call's shape
    (a larger request later may need more). The automatic forward chunk (no `--forward-chunk-size`)
    stays only where it keeps more blocks resident: chunking costs a few percent of the step (Wan2.1-1.3B
    480p x 81 on an H200, 2026-12-04: 0.619 s chunked against 0.594 s with every block resident)."""
    from ditserve.accel.activations import chunk_of, disable_forward_chunking, estimate_call

    handle = None

    def plan(_module, args, kwargs):
        handle.remove()
        try:
            gib = estimate_call(dit, args, kwargs).peak_bytes / GIB
            chunk = chunk_of(dit) if memory.forward_chunk_size is None else None
            if chunk:
                whole = _unchunked_gib(dit, chunk, args, kwargs)
                budget, group = memory.gpu_memory_budget_gib, memory.offload_group_size
                kept = resident_blocks(dit, group, budget, whole)
                if kept and kept >= resident_blocks(dit, group, budget, gib):  # (0 kept: it may not fit at all)
                    log.info("%s: unchunked activations (%.2f GiB) fit the budget as well as chunked (%.2f GiB): "
                             "forward chunking off", name, whole, gib)
                    disable_forward_chunking(dit)
                    gib = whole
        except Exception as exc:  # noqa: BLE001 - the estimate is an aid: fall back to the fixed reserve
            log.warning("%s: no activation estimate (%s: %s); keeping %.1f GiB free for activations", name,
                        type(exc).__name__, exc, ACTIVATION_RESERVE_GIB)
            gib = ACTIVATION_RESERVE_GIB
        offloader.activation_gib[name] = gib
        log.info("%s: activations of this call estimated at %.2f GiB; planning the %.1f GiB budget around them",
                 name, gib, memory.gpu_memory_budget_gib)
        offloader.replan(name, stream_blocks(dit, device, memory.offload_group_size, memory.gpu_memory_budget_gib,
                                             name, gib))

    handle = dit.register_forward_pre_hook(plan, with_kwargs=True)
