"""Load a checkpoint directory into our model: build on the meta device, then put each tensor from the
safetensors files in place, one at a time, so peak memory stays close to the size of the weights."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lfm2cli.checkpoint import (
    TensorInfo,
    check_tensors,
    read_all_headers,
    read_header,
    uses_own_head,
    weight_files,
)
from lfm2cli.config import Lfm2Config, load_config
from lfm2cli.errors import CheckpointError, UsageError
from lfm2cli.model import Lfm2ForCausalLM

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
KEEP_FLOAT32 = ("expert_bias",)  # routing biases are tiny and only compared, never multiplied


@dataclass
class LoadedModel:
    model: Lfm2ForCausalLM
    config: Lfm2Config
    path: Path
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any = None  # lfm2cli.tokenizer.Tokenizer when the checkpoint has tokenizer files


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


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); else bf16 matmuls are slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.machine() in ("arm64", "aarch64")  # Apple silicon and recent Arm cores
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
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


def read_tensor(info: TensorInfo, data_start: int, f: BinaryIO) -> torch.Tensor:
    """Read one tensor with plain file reads into a fresh buffer: no mmap (its pages would count as a
    second copy in RSS) and no pickle."""
    if info.dtype not in TORCH_DTYPES:
        raise CheckpointError(f"{info.file}: tensor {info.name} has unsupported dtype {info.dtype}")
    buf = torch.empty(info.end - info.start, dtype=torch.uint8)
    f.seek(data_start + info.start)
    if f.readinto(memoryview(buf.numpy())) != buf.numel():
        raise CheckpointError(f"{info.file}: truncated while reading {info.name}; download it again")
    return buf.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)


def load_model(path: Path, cfg: Lfm2Config, device: torch.device, dtype: torch.dtype) -> Lfm2ForCausalLM:
    headers = read_all_headers(path)  # raises for missing shards and truncated files
    check_tensors(cfg, headers, str(path))
    own_head = uses_own_head(cfg, headers)
    with torch.device("meta"):
        model = Lfm2ForCausalLM(cfg, own_head=own_head)
    wanted = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    for file in weight_files(path):
        tensors, data_start = read_header(file)
        with file.open("rb", buffering=0) as f:
            # in file order, so the disk reads sequentially
            for info in sorted(tensors.values(), key=lambda t: t.start):
                if info.name not in wanted:
                    continue  # e.g. an lm_head stored next to tied embeddings
                target = torch.float32 if info.name.endswith(KEEP_FLOAT32) else dtype
                t = read_tensor(info, data_start, f).to(device=device, dtype=target)
                _assign(model, info.name, t)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"{path}: tensors not loaded: {', '.join(left[:5])}")
    model.eval()
    model.setup_runtime(device)
    return model


def load(path: str | Path, device: str = "auto", dtype: str = "auto", tokenizer: bool = True) -> LoadedModel:
    """Load config, weights and (when present) tokenizer from a checkpoint directory."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory holding a model checkpoint")
    cfg = load_config(root)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = load_model(root, cfg, dev, dt)
    tok = None
    if tokenizer and (root / "tokenizer.json").is_file():
        from lfm2cli.tokenizer import load_tokenizer

        tok = load_tokenizer(root)
    return LoadedModel(model=model, config=cfg, path=root, device=dev, dtype=dt, tokenizer=tok)
