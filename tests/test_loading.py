"""Loading checkpoints: broken checkpoints fail with one readable line; torch stays out of `--help`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lfm2cli.checkpoint import parameter_counts, read_all_headers
from lfm2cli.config import load_config
from lfm2cli.errors import CheckpointError, ConfigError
from lfm2cli.loading import load
from tests.tiny import edit_config, make_checkpoint


def one_line_error(path: Path, exc: type[Exception] = CheckpointError) -> str:
    with pytest.raises(exc) as info:
        load(path, device="cpu", dtype="float32", tokenizer=False)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_missing_tensor(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    message = one_line_error(path)
    assert "missing" in message and "model.layers.1.self_attn.k_proj.weight" in message


def test_wrong_shape_and_unexpected_tensor(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "w")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.conv.out_proj.weight"] = torch.zeros(64, 32)
    tensors["model.layers.0.conv.surprise"] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors")
    message = one_line_error(path)
    assert "wrong shape" in message and "model.layers.0.conv.out_proj.weight [64, 32]" in message
    assert "unexpected" in message and "model.layers.0.conv.surprise" in message


def test_truncated_file(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "t")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error(path)


def test_missing_shard(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "s", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (path / victim).unlink()
    assert victim in one_line_error(path)


def test_unknown_model_type(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "u")
    edit_config(path, model_type="llama")
    message = one_line_error(path, ConfigError)
    assert "llama" in message and "config.json" in message and "lfm2_moe" in message


def test_missing_required_key_names_file_and_key(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "k")
    edit_config(path, hidden_size=None)
    message = one_line_error(path, ConfigError)
    assert "hidden_size" in message and str(path / "config.json") in message


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "lfm2", "hidden_size": 8, "num_hidden_layers": 1,
                                                   "num_attention_heads": 1, "vocab_size": 8,
                                                   "intermediate_size": 8}))
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "safetensors" in one_line_error(path)


def test_config_normalisation_and_generation_config_eos(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "g", moe=True, routed_scaling_factor=1.5)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    cfg = load_config(path)
    assert cfg.eos_token_ids == (2, 7)
    assert cfg.is_moe and cfg.routed_scaling_factor == 1.5 and cfg.num_dense_layers == 1
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, True, True]


def test_parameter_counts_match_headers(moe_ckpt: Path) -> None:
    cfg = load_config(moe_ckpt)
    total, active = parameter_counts(cfg)
    # expert_bias is a buffer (as transformers registers it), not a parameter
    assert total == sum(t.numel for n, t in read_all_headers(moe_ckpt).items() if not n.endswith("expert_bias"))
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = cfg.num_hidden_layers - cfg.num_dense_layers
    assert total - active == moe_layers * expert * (cfg.num_experts - cfg.num_experts_per_tok)


def test_bf16_on_disk_loads_as_requested_dtype(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "b", dtype="bfloat16")
    lm = load(path, device="cpu", dtype="float32", tokenizer=False)
    assert lm.model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())


@pytest.mark.slow
def test_peak_memory_stays_near_weight_size(tmp_path: Path) -> None:
    """No second full copy: peak RSS grows by about the weights' size, whatever the on-disk dtype."""
    path = make_checkpoint(tmp_path / "big", hidden_size=1024, intermediate_size=3072, vocab_size=4096)
    weights = (path / "model.safetensors").stat().st_size  # float32 on disk
    code = (
        "import resource, sys, torch; from lfm2cli.loading import load;"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024;"
        f"load({str(path)!r}, device='cpu', dtype=sys.argv[1], tokenizer=False);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)"
    )
    for dtype, size in (("float32", weights), ("bfloat16", weights // 2)):
        grew = int(subprocess.run([sys.executable, "-c", code, dtype], capture_output=True, text=True,
                                  check=True).stdout)
        assert grew < size * 1.25 + 40e6, (dtype, grew, size)


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; import lfm2cli, lfm2cli.cli; sys.argv = ['lfm2', '--help'];\n"
        "try:\n    lfm2cli.cli.main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout and out.stdout.strip().endswith("ok")
