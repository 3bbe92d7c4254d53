"""Load a checkpoint directory into our model: build on the meta device, then put each tensor from the
safetensors files in place, one at a time, so peak memory stays close to the size of the weights."""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lfm2cli.errors import CheckpointError, UsageError
from lfm2cli.loading.checkpoint import (
    TensorInfo,
    check_tensors,
    inspect_checkpoint,
    read_all_headers,
    read_header,
    uses_own_head,
    weight_files,
)
from lfm2cli.model.config import Lfm2Config
from lfm2cli.model.lfm2 import Lfm2ForCausalLM
from lfm2cli.system import cpu

if TYPE_CHECKING:
    from lfm2cli.kernels.plan import Plan

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
READ_AHEAD = 256 << 20  # bytes of tensors read ahead of the one being placed (see _read_all)
KEEP_FLOAT32 = ("expert_bias",)  # routing biases are tiny and only compared, never multiplied


@dataclass
class LoadedModel:
    model: Lfm2ForCausalLM
    config: Lfm2Config
    path: Path
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any = None  # lfm2cli.text.tokenizer.Tokenizer when the checkpoint has tokenizer files
    quantize: str | None = None  # "int8" or "int4" when weights were quantised at load time
    skipped: dict[str, str] = field(default_factory=dict)  # options asked for and not applied: the reasons
    plan: Plan | None = None  # which code runs each part of the model on this machine


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available to torch")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for, but MPS is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        cpu.asked_level()  # a mistyped LFM2_NATIVE_ISA is an error whatever the dtype, not a quiet fallback
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.bfloat16
        # bf16 weights where the CPU computes bf16 or lfm2's native kernels run (they read bf16 and compute in
        # float32 where the CPU has no bf16 arithmetic): half of float32's bytes. Elsewhere float32.
        from lfm2cli.kernels.plan import native_available

        native = native_available(device, torch.bfloat16) is None
        return torch.bfloat16 if cpu.bf16_compute() or native else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return DTYPES[dtype]


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise CheckpointError(f"tensor {name} has no place in the model")


TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


Reader = Callable[[memoryview, int], int]  # fill a view from a file offset; returns the bytes read
# told (bytes of weights in place, bytes in all) as a model loads, for a progress bar (lfm2cli.terminal.load_progress)
Progress = Callable[[int, int], None]


def file_reader(fd: int) -> Reader:
    """Positioned reads (os.preadv) where they exist, so several threads can read one file at once: copying
    from the page cache and faulting in fresh pages is per-core work, and two cores halve a warm load."""
    if hasattr(os, "preadv"):
        return lambda view, offset: os.preadv(fd, [view], offset)

    def seek_and_read(view: memoryview, offset: int) -> int:  # Windows: one reader at a time
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, len(view))
        view[:len(data)] = data
        return len(data)

    return seek_and_read


def read_tensor(info: TensorInfo, data_start: int, read: Reader, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with plain file reads into its own buffer: no mmap (its pages would count as a second copy
    in RSS) and no pickle. `out`: a contiguous CPU tensor of the tensor's dtype and shape to read into (rows of a
    fused buffer)."""
    if info.dtype not in TORCH_DTYPES:
        raise CheckpointError(f"{info.file}: tensor {info.name} has unsupported dtype {info.dtype}")
    if out is not None:
        buf = out.view(-1).view(torch.uint8)
        if buf.numel() != info.end - info.start:
            raise CheckpointError(f"{info.file}: tensor {info.name} has the wrong size")
    else:
        buf = torch.empty(info.end - info.start, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    while done < len(view):
        n = read(view[done:], data_start + info.start + done)
        if n <= 0:
            raise CheckpointError(f"{info.file}: truncated while reading {info.name}; download it again")
        done += n
    return buf.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)


def _read_all(file: Path, infos: list[TensorInfo], data_start: int, direct: dict[str, torch.Tensor]
              ) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """Tensors of one file in file order, read by a few threads where positioned reads allow it. Tensors named
    in `direct` are read straight into the given tensor."""
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    read = file_reader(fd)
    workers = min(4, cpu.physical_cores()) if hasattr(os, "preadv") else 1
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # reads run ahead of the caller by READ_AHEAD bytes at most: the caller may convert each tensor to a
            # smaller form, and reads that got far ahead would hold the full-precision model after all
            pending: deque[tuple[TensorInfo, Future]] = deque()
            ahead = 0
            for info in infos:
                while pending and ahead + (info.end - info.start) > READ_AHEAD:
                    done, future = pending.popleft()
                    ahead -= done.end - done.start
                    yield done, future.result()
                pending.append((info, pool.submit(read_tensor, info, data_start, read, direct.get(info.name))))
                ahead += info.end - info.start
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
    finally:
        os.close(fd)


def fused_slots(model: Lfm2ForCausalLM, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One buffer per group of projections that the fast form fuses (q/k/v, w1/w3), and for each
    checkpoint tensor of a group its rows in that buffer: loaded there, the fused matrix needs no copy."""
    slots: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        parts = getattr(module, "FUSED", ())
        if not parts:
            continue
        shapes = [getattr(module, p).weight.shape for p in parts]
        buf = torch.empty(sum(s[0] for s in shapes), shapes[0][1], device=device, dtype=dtype)
        row = 0
        for part, shape in zip(parts, shapes, strict=True):
            slots[f"{name}.{part}.weight"] = buf[row:row + shape[0]]
            row += shape[0]
    return slots


def configure_allocator(threshold: int = 64 << 10) -> None:
    """glibc only: allocations of `threshold` bytes or more get their own mapping, returned to the OS when freed.
    While loading, 64 kB: by default glibc raises the threshold after the first large free, so the transient
    copies made while fusing, quantising and packing weights would stay in the heap, and below 1 MB the freed
    int4 scales of each expert left holes there (+7% resident memory for LFM2-24B-A2B in int4, measured).
    After loading, 32 MB (glibc's own upper limit): activations are then reused from the heap instead of being
    mapped and faulted in afresh at every layer."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def configure_threads(device: torch.device) -> None:
    """One compute thread per physical core on CPU, unless the user chose (OMP_NUM_THREADS)."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        n = cpu.physical_cores()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def plan_fast_form(model: Lfm2ForCausalLM, device: torch.device, dtype: torch.dtype, *, quantize: str | None,
                   compile: bool, fast: bool, native: bool) -> Plan:
    """What `lfm2cli.kernels` will make of the model (the decode plan, `kernels.plan.plan`), decided before any
    weight is read."""
    from lfm2cli.kernels.plan import plan

    configure_threads(device)
    return plan(model.config, device, dtype, quantize=quantize, compile=compile, fast=fast, native=native)


class UnitTracker:
    """Turns each part of the model (`kernels.plan.units`: an attention, a conv, an MLP or expert, a router) into its
    fast form as soon as its last tensor is in place, so that a quantised model never exists in full precision:
    peak memory is the converted parts plus the few being read."""

    def __init__(self, model: Lfm2ForCausalLM, plan: Plan, names: list[str], slots: dict[str, torch.Tensor]
                 ) -> None:
        from lfm2cli.kernels.plan import units

        self.model, self.plan, self.slots = model, plan, slots
        units = units(model) if plan.accelerate else {}
        self.unit_of: dict[str, str] = {}
        self.names: dict[str, list[str]] = {}  # each unit's tensors
        for name in names:
            parts = name.split(".")
            unit = next((u for k in range(len(parts) - 1, 0, -1) if (u := ".".join(parts[:k])) in units), None)
            if unit is not None:
                self.unit_of[name] = unit
                self.names.setdefault(unit, []).append(name)
        self.left = {unit: len(tensors) for unit, tensors in self.names.items()}

    def placed(self, name: str) -> None:
        from lfm2cli.kernels.plan import accelerate_unit

        unit = self.unit_of.get(name)
        if unit is None:
            return
        self.left[unit] -= 1
        if not self.left[unit]:
            accelerate_unit(self.model, unit, self.plan)
            for n in self.names[unit]:
                self.slots.pop(n, None)  # the fused buffer goes once its unit has its own form


def finish_model(model: Lfm2ForCausalLM, device: torch.device, plan: Plan) -> Lfm2ForCausalLM:
    """Runtime tensors, then the rest of the fast form (`lfm2cli.kernels.plan.apply`), which leaves the plan in
    `model.decode_plan`: what it skipped, and why, is there for the caller to tell the user."""
    from lfm2cli.kernels.plan import apply

    model.eval()
    model.setup_runtime(device)
    apply(model, plan)
    configure_allocator(32 << 20)
    return model


def load_model(path: Path, cfg: Lfm2Config, device: torch.device, dtype: torch.dtype, *,
               quantize: str | None = None, compile: bool = False, fast: bool = True, native: bool = True,
               headers: dict[str, TensorInfo] | None = None, progress: Progress | None = None
               ) -> Lfm2ForCausalLM:
    """The model of checkpoint `path`. `headers`: its headers as `inspect_checkpoint` read and checked them;
    without them they are read and checked here. `progress` is told the bytes of weights read so far."""
    configure_allocator()
    if headers is None:
        headers = read_all_headers(path, cfg)  # raises for missing shards and damaged or truncated files
        check_tensors(cfg, headers, str(path))
    own_head = uses_own_head(cfg, headers)
    with torch.device("meta"):
        model = Lfm2ForCausalLM(cfg, own_head=own_head)
    wanted = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    plan = plan_fast_form(model, device, dtype, quantize=quantize, compile=compile, fast=fast, native=native)
    slots = fused_slots(model, device, dtype) if plan.accelerate else {}
    units = UnitTracker(model, plan, sorted(wanted), slots)
    files = [(file, *read_header(file)) for file in weight_files(path, cfg)]
    total = sum(t.end - t.start for _, tensors, _ in files for t in tensors.values() if t.name in wanted)
    done = 0
    if progress is not None:
        progress(0, total)
    for file, tensors, data_start in files:
        # in file order, so the disk reads sequentially; skip e.g. an lm_head stored next to tied embeddings
        infos = [t for t in sorted(tensors.values(), key=lambda t: t.start) if t.name in wanted]
        direct = {i.name: slots[i.name] for i in infos if i.name in slots and device.type == "cpu"
                  and TORCH_DTYPES.get(i.dtype) == dtype and tuple(i.shape) == tuple(slots[i.name].shape)}
        for info, raw in _read_all(file, infos, data_start, direct):
            target = torch.float32 if info.name.endswith(KEEP_FLOAT32) else dtype
            if info.name in slots and info.name not in direct:
                raw = slots[info.name].copy_(raw)  # converts the dtype / moves to the device
            _assign(model, info.name, raw.to(device=device, dtype=target))
            del raw
            units.placed(info.name)
            done += info.end - info.start
            if progress is not None:
                progress(done, total)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"{path}: tensors not loaded: {', '.join(left[:5])}")
    return finish_model(model, device, plan)


RANDOM_POOL = 1 << 22  # random values generated per model; tensors are tiled from them (fast for 8B models)


def random_model(cfg: Lfm2Config, device: torch.device, dtype: torch.dtype, *, quantize: str | None = None,
                 compile: bool = False, fast: bool = True, native: bool = True, seed: int = 0,
                 progress: Progress | None = None) -> Lfm2ForCausalLM:
    """A model of `cfg`'s shape with random weights, built tensor by tensor in `dtype` on `device` (never a
    float32 copy of the whole model), for benchmarks. Values are uniform with std ~ 1/sqrt(fan-in), norms 1;
    weights repeat with a period of RANDOM_POOL values, which changes nothing in speed. `progress` is told the
    bytes of weights built so far."""
    configure_allocator()
    gen = torch.Generator().manual_seed(seed)
    pool = torch.rand(RANDOM_POOL, generator=gen).mul_(2).sub_(1).to(device=device, dtype=dtype)
    with torch.device("meta"):
        model = Lfm2ForCausalLM(cfg)
    plan = plan_fast_form(model, device, dtype, quantize=quantize, compile=compile, fast=fast, native=native)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    units = UnitTracker(model, plan, [n for n, _ in tensors], {})
    sizes = [p.numel() * (4 if name.endswith(KEEP_FLOAT32) else dtype.itemsize) for name, p in tensors]
    total, built = sum(sizes), 0
    if progress is not None:
        progress(0, total)
    for (name, p), size in zip(tensors, sizes, strict=True):
        target = torch.float32 if name.endswith(KEEP_FLOAT32) else dtype
        t = torch.empty(p.shape, device=device, dtype=target)
        if name.endswith(KEEP_FLOAT32):
            t.zero_()
        elif p.dim() == 1 and "norm" in name:
            t.fill_(1.0)
        else:
            # tile the pool over the tensor, starting at a random point of it; then scale to std 1/sqrt(fan-in)
            flat, done = t.view(-1), 0
            offset = int(torch.randint(0, RANDOM_POOL, (1,), generator=gen))
            while done < flat.numel():
                n = min(RANDOM_POOL - offset, flat.numel() - done)
                flat[done:done + n].copy_(pool[offset:offset + n])
                done, offset = done + n, 0
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            t.mul_(3 ** 0.5 / max(fan_in, 1) ** 0.5)
        _assign(model, name, t)
        del t
        units.placed(name)
        built += size
        if progress is not None:
            progress(built, total)
    return finish_model(model, device, plan)


def load(path: str | Path, device: str = "auto", dtype: str = "auto", tokenizer: bool = True,
         quantize: str | None = None, compile: bool = False, force: bool = False,
         progress: Progress | None = None) -> LoadedModel:
    """Load config, weights and (when present) tokenizer from a checkpoint directory. `quantize="int8"` or
    `"int4"` quantises weights at load time; `compile=True` compiles the decode step with torch.compile.
    Refuses (MemoryLimitError) a model that does not fit in the available memory unless `force`. `progress`
    is told (bytes read, bytes in all) as the weights are read."""
    from lfm2cli.kernels.quantize import check_mode

    quantize = check_mode(quantize)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory holding a model checkpoint")
    # the same check as `lfm2 info`'s, before any weight is read
    found = inspect_checkpoint(root, tokenizer=tokenizer)
    found.raise_problems()
    cfg = found.config
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not force:
        from lfm2cli.loading.fit import check_fits

        check_fits(cfg, quantize, dt, dev)
    model = load_model(root, cfg, dev, dt, quantize=quantize, compile=compile, headers=found.headers,
                       progress=progress)
    return LoadedModel(model=model, config=cfg, path=root, device=dev, dtype=dt, tokenizer=found.tokenizer,
                       quantize=quantize, skipped=model.decode_plan.skipped, plan=model.decode_plan)
