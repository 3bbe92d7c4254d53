"""Loading checkpoints: broken checkpoints fail with one readable line; torch stays out of `--help`."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lfm2cli.errors import CheckpointError, ConfigError
from lfm2cli.loading.checkpoint import parameter_counts, read_all_headers
from lfm2cli.loading.loader import load
from lfm2cli.model.config import load_config
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
        "import resource, sys, torch; from lfm2cli.loading.loader import load;"
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


# ---- damaged and hostile checkpoints (issue 14): `info` and `generate` refuse alike, in one line ----

def _cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple:
    """The real entry point with its error boundary, in-process, with an empty stdin."""
    import io

    from lfm2cli.cli import main

    monkeypatch.delenv("LFM2_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["lfm2", *args])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    capsys.readouterr()  # what building the checkpoint printed is not the command's
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def _set_config(root: Path, file: str = "config.json", **changes: object) -> None:
    """Unlike tests.tiny.edit_config, None writes null instead of removing the key."""
    path = root / file
    raw = json.loads(path.read_text()) if path.is_file() else {}
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _rewrite_header(file: Path, change) -> None:
    """Edit a safetensors header by hand (the data section is kept as it is)."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header = change(header)
    blob = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])


def _entry(key: str, value: object, name: str = "model.layers.0.ffn_norm.weight"):
    def change(header: dict) -> dict:
        header[name][key] = value
        return header
    return change


def _retype(name: str, dtype: torch.dtype):
    def build(root: Path) -> None:
        tensors = load_file(root / "model.safetensors")
        tensors[name] = (tensors[name] * 10).to(dtype)
        save_file(tensors, root / "model.safetensors")
    return build


NORM = "model.layers.0.ffn_norm.weight"
W1 = "model.layers.0.feed_forward.w1.weight"

# name -> (what is damaged, the words the one-line error must hold: the file and the key)
DAMAGED = {
    "hidden_size string": (lambda r: _set_config(r, hidden_size="sixty-four"), ["config.json", "'hidden_size'",
                                                                                   '"sixty-four"', "whole number"]),
    "zero heads": (lambda r: _set_config(r, num_attention_heads=0), ["config.json", "'num_attention_heads' is 0"]),
    "negative context": (lambda r: _set_config(r, max_position_embeddings=-5),
                         ["config.json", "'max_position_embeddings' is -5"]),
    "null context": (lambda r: _set_config(r, max_position_embeddings=None),
                     ["config.json", "'max_position_embeddings' is null"]),
    "rope_parameters string": (lambda r: _set_config(r, rope_parameters="abc"),
                               ["config.json", "'rope_parameters' is \"abc\"", "an object"]),
    "rope_theta zero": (lambda r: _set_config(r, rope_parameters=None, rope_theta=0),
                        ["config.json", "'rope_theta' is 0", "a number > 0"]),
    "rope_parameters theta zero": (lambda r: _set_config(r, rope_parameters={"rope_type": "default", "rope_theta": 0}),
                                   ["config.json", "'rope_parameters.rope_theta' is 0"]),
    "norm_eps string": (lambda r: _set_config(r, norm_eps="small"), ["config.json", "'norm_eps'"]),
    "layer_types not a list": (lambda r: _set_config(r, layer_types="conv"), ["config.json", "'layer_types'"]),
    "config not UTF-8": (lambda r: (r / "config.json").write_bytes(b'{"model_type": "lfm2\xff"}'),
                         ["config.json", "not UTF-8"]),
    "generation_config eos": (lambda r: _set_config(r, "generation_config.json", eos_token_id=["a"]),
                              ["generation_config.json", "'eos_token_id' is [\"a\"]", "token id"]),
    "eos id past vocab": (lambda r: _set_config(r, "generation_config.json", eos_token_id=[7, 600]),
                          ["generation_config.json", "'eos_token_id' 600", "'vocab_size' 512"]),
    "header is a list": (lambda r: _rewrite_header(r / "model.safetensors", lambda h: [1, 2]),
                         ["model.safetensors", "a JSON list", "expected an object"]),
    "entry not an object": (lambda r: _rewrite_header(r / "model.safetensors", lambda h: {**h, NORM: "x"}),
                            ["model.safetensors", NORM, "not an object"]),
    "offsets null": (lambda r: _rewrite_header(r / "model.safetensors", _entry("data_offsets", None)),
                     ["model.safetensors", NORM, "data_offsets null", "[start, end]"]),
    "offsets reversed": (lambda r: _rewrite_header(r / "model.safetensors", _entry("data_offsets", [256, 0])),
                         ["model.safetensors", NORM, "data_offsets [256, 0]"]),
    "offsets short": (lambda r: _rewrite_header(r / "model.safetensors", _entry("data_offsets", [0, 8])),
                      ["model.safetensors", NORM, "takes 256 bytes"]),
    "offsets negative": (lambda r: _rewrite_header(r / "model.safetensors", _entry("data_offsets", [-256, 0])),
                         ["model.safetensors", NORM, "data_offsets [-256, 0]"]),
    "offsets strings": (lambda r: _rewrite_header(r / "model.safetensors", _entry("data_offsets", ["0", "256"])),
                        ["model.safetensors", NORM, "data_offsets"]),
    "shape string": (lambda r: _rewrite_header(r / "model.safetensors", _entry("shape", "64")),
                     ["model.safetensors", NORM, "shape \"64\""]),
    "unknown dtype": (lambda r: _rewrite_header(r / "model.safetensors", _entry("dtype", "Q4_K")),
                      ["model.safetensors", NORM, "unknown dtype \"Q4_K\""]),
    "I8 weight": (_retype(W1, torch.int8), [W1, "I8", "not a float dtype", "BF16"]),
    "U8 weight": (_retype(W1, torch.uint8), [W1, "U8", "not a float dtype"]),
    "BOOL norm": (_retype(NORM, torch.bool), [NORM, "BOOL", "not a float dtype"]),
    "F8 weight": (_retype(W1, torch.float8_e4m3fn), [W1, "F8_E4M3", "not a float dtype"]),
}


def _assert_refused(root: Path, words: list[str], monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture) -> None:
    """`info` and `generate` both exit 1 with one stderr line holding `words`, and change no file."""
    before = _files(root)
    for args in (["info", str(root)], ["generate", str(root), "-p", "hi", "--device", "cpu", "-n", "2"]):
        code, _out, err = _cli(args, monkeypatch, capsys)
        assert code == 1, (args[0], err)
        assert err.startswith("error: ") and err.count("\n") == 1, (args[0], err)
        assert "Traceback" not in err and "Error:" not in err, err  # ours, not a raw Python exception
        for word in words:
            assert word in err, (args[0], word, err)
    assert _files(root) == before


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DAMAGED))
def test_damaged_checkpoint_is_refused_by_info_and_generate(kind: str, dense_ckpt: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    import shutil

    root = Path(shutil.copytree(dense_ckpt, tmp_path / "ckpt"))
    damage, words = DAMAGED[kind]
    damage(root)
    _assert_refused(root, words, monkeypatch, capsys)


MOE_DAMAGED = {
    "no experts": ({"num_experts": 0}, "'num_experts' is 0"),
    "zero experts per token": ({"num_experts_per_tok": 0}, "'num_experts_per_tok' is 0"),
    "more experts per token than experts": ({"num_experts_per_tok": 9}, "from 1 to num_experts (8)"),
    "dense layers past the model": ({"num_dense_layers": 5}, "'num_dense_layers' is 5"),
}


@pytest.mark.parametrize("kind", list(MOE_DAMAGED))
def test_moe_config_out_of_range_is_refused(kind: str, moe_ckpt: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import shutil

    root = Path(shutil.copytree(moe_ckpt, tmp_path / "ckpt"))
    changes, words = MOE_DAMAGED[kind]
    _set_config(root, **changes)
    _assert_refused(root, ["config.json", words], monkeypatch, capsys)


def _sharded(tmp_path: Path, name: str = "s") -> Path:
    return make_checkpoint(tmp_path / name, max_shard_size="40KB")


def _point_index(root: Path, target: object) -> str:
    """Make the index name `target` for one tensor; returns that tensor's name."""
    index_file = root / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = target
    index_file.write_text(json.dumps(index))
    return name


@pytest.mark.parametrize("target", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors", ".."])
def test_index_cannot_name_files_outside_the_checkpoint(target: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """Refused from the name alone: the file it names is never opened (so never parsed as a header)."""
    root = _sharded(tmp_path)
    _point_index(root, target)
    _assert_refused(root, ["model.safetensors.index.json", "weight_map", repr(target), "plain file name"],
                    monkeypatch, capsys)


def test_index_shard_linked_outside_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    root = _sharded(tmp_path)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere.safetensors"
    (root / shard).rename(outside)
    (root / shard).symlink_to(outside)
    _assert_refused(root, ["model.safetensors.index.json", shard, "outside the checkpoint"], monkeypatch, capsys)
    # a link that stays inside the checkpoint is fine (a user's own layout)
    (root / shard).unlink()
    outside.rename(root / "real.bin")
    (root / shard).symlink_to(root / "real.bin")
    assert load(root, device="cpu", dtype="float32", tokenizer=False).config.vocab_size == 512


def test_index_value_not_a_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    root = _sharded(tmp_path)
    _point_index(root, 7)
    _assert_refused(root, ["model.safetensors.index.json", "weight_map value 7", "not a string"],
                    monkeypatch, capsys)


def test_tokenizer_past_the_embedding_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    """A tokenizer of 400 ids over an embedding table of 256 rows: refused before any id is looked up."""
    from tests.tiny_tokenizer import make_tokenizer

    root = make_checkpoint(tmp_path / "v", vocab_size=256)
    make_tokenizer(root, vocab_size=400)
    _assert_refused(root, ["tokenizer.json", "399", "256 rows", "'vocab_size'"], monkeypatch, capsys)


def test_info_and_load_run_the_same_check(dense_ckpt: Path, tmp_path: Path) -> None:
    """Whatever `info` lists under "problems" is what loading raises, word for word."""
    import shutil

    from lfm2cli.loading.describe import describe

    root = Path(shutil.copytree(dense_ckpt, tmp_path / "ckpt"))
    _retype(W1, torch.int8)(root)
    _set_config(root, "generation_config.json", eos_token_id=600)
    problems = describe(root)["problems"]
    assert len(problems) == 2
    with pytest.raises(CheckpointError) as info:
        load(root, device="cpu", dtype="float32", tokenizer=False)
    assert str(info.value) == "; ".join(problems)


def test_bench_random_shape_that_cannot_be_allocated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """--force skips the memory guard; torch's allocator failure is then the tool's own out-of-memory line."""
    from tests.tiny import DENSE

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**DENSE, "model_type": "lfm2", "vocab_size": 2 ** 31 - 1}))  # the largest allowed
    code, out, err = _cli(["bench", "--random", str(config), "--force", "--device", "cpu", "--dtype", "float32",
                           "--prompt-tokens", "8", "--gen-tokens", "2", "--repeat", "1"], monkeypatch, capsys)
    assert code == 1 and out == ""
    assert err.startswith("error: out of memory while building") and err.count("\n") == 1, err
    assert str(config) in err and "RuntimeError" not in err


def test_hf_cache_links_into_blobs_are_allowed(tmp_path: Path) -> None:
    """The standard Hugging Face cache keeps every file of a snapshot as a link into the repo's blobs/: those
    links leave the snapshot directory, and they are fine."""
    from lfm2cli.loading.checkpoint import weight_files

    src = _sharded(tmp_path)
    repo = tmp_path / "hub" / "models--LiquidAI--LFM2-Test"
    snap, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(src.iterdir())):
        (blobs / f"blob{i}").write_bytes(file.read_bytes())
        (snap / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert [f.name for f in weight_files(snap)] == sorted(f.name for f in src.glob("*.safetensors"))
    assert load(snap, device="cpu", dtype="float32", tokenizer=False).config.hidden_size == 64


@pytest.mark.slow
def test_damaged_checkpoint_in_a_real_process(dense_ckpt: Path, tmp_path: Path) -> None:
    """The installed command, end to end: one line, exit 1, for both commands; stdout of `generate` empty."""
    import os
    import shutil

    root = Path(shutil.copytree(dense_ckpt, tmp_path / "ckpt"))
    _rewrite_header(root / "model.safetensors", _entry("data_offsets", [256, 0]))
    env = {k: v for k, v in os.environ.items() if k != "LFM2_DEBUG"}
    for args in (["info", str(root)], ["generate", str(root), "-p", "hi"]):
        run = subprocess.run([sys.executable, "-m", "lfm2cli", *args], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, env=env, timeout=120)
        assert run.returncode == 1 and run.stdout == ""
        assert run.stderr.count("\n") == 1 and "data_offsets [256, 0]" in run.stderr and NORM in run.stderr


# ---- a model that is nowhere is said before torch is imported (issue 23)

NOWHERE = [
    (["generate", "no-such-model", "-p", "hi"], 2, "'no-such-model' is not a local directory"),
    (["chat", "no-such-model"], 2, "'no-such-model' is not a local directory"),
    (["serve", "no-such-model", "--port", "0"], 2, "'no-such-model' is not a local directory"),
    (["bench", "no-such-model"], 2, "'no-such-model' is not a local directory"),
    (["info", "no-such-model"], 2, "'no-such-model' is not a local directory"),
    (["generate", "./no-such-dir", "-p", "hi"], 1, "./no-such-dir: no such checkpoint directory"),
    (["chat", "./no-such-dir"], 1, "./no-such-dir: no such checkpoint directory"),
    (["generate", "lfm2-1.2b", "-p", "hi"], 1, "LiquidAI/LFM2-1.2B is not downloaded yet"),
    (["serve", "lfm2-1.2b", "--port", "0", "--offline"], 1, "LiquidAI/LFM2-1.2B is not downloaded and offline"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "code", "message"), NOWHERE, ids=[" ".join(a[:2]) for a, _, _ in NOWHERE])
def test_a_model_that_is_nowhere_is_reported_without_importing_torch(args: list[str], code: int, message: str,
                                                                     tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "LFM2_DEBUG"}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty Hugging Face cache, whatever this machine holds
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "lfm2cli", *args], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, env=env, timeout=120, cwd=tmp_path)
    timings = [line for line in run.stderr.splitlines() if line.startswith("import time:")]
    said = [line for line in run.stderr.splitlines() if not line.startswith("import time:")]
    assert timings, "python -X importtime reported no imports"
    assert not [line for line in timings if line.split("|")[-1].strip() == "torch"], "torch was imported"
    assert run.returncode == code and run.stdout == ""
    assert len(said) == 1 and said[0].startswith("error: ") and message in said[0], said


# ---- sizes counted before anything is listed (issue 24; the real commands are in test_hostile_checkpoint.py)

def test_tensor_count_is_the_length_of_the_list() -> None:
    """The memory guard and the header budget count tensors from the sizes alone; the count is exact."""
    from lfm2cli.hub.known import KNOWN_CONFIGS
    from lfm2cli.loading.checkpoint import expected_tensors, tensor_count
    from lfm2cli.model.config import parse_config
    from tests.tiny import DENSE, MOE

    configs = [parse_config(raw) for raw in KNOWN_CONFIGS.values()]
    for raw, model_type in ((DENSE, "lfm2"), (MOE, "lfm2_moe")):
        for extra in ({}, {"conv_bias": True}, {"tie_word_embeddings": False}, {"use_expert_bias": False}):
            configs.append(parse_config({**raw, "model_type": model_type, **extra}))
    for cfg in configs:
        assert tensor_count(cfg) == len(expected_tensors(cfg))


def test_json_numbers_and_nesting_past_the_bounds_are_one_cause() -> None:
    from lfm2cli.model.config import parse_json

    assert parse_json('{"a": [1, -2, 3.5]}') == {"a": [1, -2, 3.5]}
    with pytest.raises(ValueError, match="^a number of 4,400 digits$"):
        parse_json("[" + "9" * 4_400 + "]")
    with pytest.raises(ValueError, match="^nested too deeply"):
        parse_json("[" * 50_000 + "]" * 50_000)
