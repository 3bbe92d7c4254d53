"""`lfm2 info`: the description is right (checked against the safetensors headers and the config), the
output formats behave, errors are one line, and the command never imports torch."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lfm2cli.cli import app
from lfm2cli.errors import Lfm2Error
from lfm2cli.loading.checkpoint import expected_tensors, read_all_headers
from lfm2cli.loading.describe import describe, plain_lines
from lfm2cli.model.config import parse_config
from lfm2cli.terminal.formatting import human_bytes, human_count
from tests.helpers import run_main
from tests.tiny import edit_config, make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("sharded"), max_shard_size="20KB")


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("bf16"), dtype="bfloat16")


def _copy(src: Path, tmp_path: Path) -> Path:
    """Tests that change files work on a copy, never on the shared session checkpoints."""
    return Path(shutil.copytree(src, tmp_path / "ckpt"))


def _numels(root: Path) -> dict[str, int]:
    return {name: t.numel for name, t in read_all_headers(root).items()}


def test_dense_description_matches_headers_and_config(dense_ckpt: Path) -> None:
    d = describe(dense_ckpt)
    headers = read_all_headers(dense_ckpt)
    total = sum(t.numel for t in headers.values())
    assert d["architecture"] == "LFM2" and d["model_type"] == "lfm2"
    assert d["parameters"] == {"total": total, "active": total}
    raw = json.loads((dense_ckpt / "config.json").read_text())
    types = raw["layer_types"]
    assert d["layers"]["layout"] == "".join("A" if t == "full_attention" else "C" for t in types) == "CACA"
    assert d["layers"]["conv"] == types.count("conv") and d["layers"]["attention"] == 2
    assert [x["mixer"] for x in d["layers"]["per_layer"]] == ["conv", "attention", "conv", "attention"]
    assert d["layers"]["moe"] == 0 and d["layers"]["ffn_layout"] == "DDDD"
    assert d["attention"] == {"heads": 4, "kv_heads": 2, "head_dim": 16, "layers": [1, 3]}
    assert d["feed_forward"] == {"dense_ff_dim": headers["model.layers.0.feed_forward.w1.weight"].shape[0]}
    assert d["hidden_size"] == 64 and d["vocab_size"] == 512 and d["context_length"] == 2048
    assert d["conv_kernel"] == 3 and d["tied_embeddings"] is True and d["rope_theta"] == 1e6
    assert d["dtypes"] == {"F32": total}
    assert d["problems"] == []
    assert "experts" not in d["feed_forward"] and "active_weights_bf16_bytes_per_token" not in d["memory"]
    mem = d["memory"]
    assert mem["weights_bf16_bytes"] == total * 2
    assert mem["weights_stored_bytes"] == total * 4 == sum(t.end - t.start for t in headers.values())
    # attention layers x (K and V) x kv_heads x head_dim x 2 bytes x 1000 tokens
    assert mem["kv_cache_bf16_bytes_per_1000_tokens"] == 2 * 2 * 2 * 16 * 2 * 1000
    assert mem["kv_cache_bf16_bytes_full_context"] == 2 * 2 * 2 * 16 * 2 * 2048
    assert mem["conv_state_bf16_bytes"] == 2 * 64 * (3 - 1) * 2  # conv layers x hidden x (kernel - 1)
    files = {f["name"]: f["bytes"] for f in d["files"]}
    assert files["model.safetensors"] == (dense_ckpt / "model.safetensors").stat().st_size
    assert "config.json" in files and d["files_total_bytes"] == sum(files.values())
    assert d["tokens"]["eos_token_ids"] == [7] and d["tokens"]["bos_token_id"] == 1
    assert d["tokens"]["chat_template"] is False
    json.dumps(d)  # JSON-ready


def test_moe_description_counts_active_experts(moe_ckpt: Path) -> None:
    d = describe(moe_ckpt)
    numels = _numels(moe_ckpt)
    numels = {k: v for k, v in numels.items() if not k.endswith("expert_bias")}  # a buffer, not a parameter
    total = sum(numels.values())
    experts = sum(n for name, n in numels.items() if ".experts." in name)
    active = total - experts + experts * 2 // 8  # top-2 of 8 experts
    assert d["architecture"] == "LFM2-MoE"
    assert d["parameters"] == {"total": total, "active": active}
    assert d["layers"]["layout"] == "CACC" and d["layers"]["ffn_layout"] == "DMMM"
    assert (d["layers"]["dense"], d["layers"]["moe"]) == (1, 3)
    assert [x["ffn"] for x in d["layers"]["per_layer"]] == ["dense", "moe", "moe", "moe"]
    headers = read_all_headers(moe_ckpt)
    assert d["feed_forward"] == {
        "dense_ff_dim": headers["model.layers.0.feed_forward.w1.weight"].shape[0],
        "expert_ff_dim": headers["model.layers.1.feed_forward.experts.0.w1.weight"].shape[0],
        "experts": 8, "experts_per_token": 2, "num_dense_layers": 1,
    }
    mem = d["memory"]
    assert mem["active_weights_bf16_bytes_per_token"] == active * 2
    bias = sum(t.end - t.start for n, t in headers.items() if n.endswith("expert_bias"))  # read, not parameters
    assert mem["active_weights_stored_bytes_per_token"] == active * 4 + bias
    assert mem["kv_cache_bf16_bytes_per_1000_tokens"] == 1 * 2 * 2 * 16 * 2 * 1000
    assert mem["conv_state_bf16_bytes"] == 3 * 64 * (3 - 1) * 2


def test_parameter_count_is_what_transformers_counts(moe_ckpt: Path) -> None:
    """`expert_bias` is a buffer in transformers, so `num_parameters()` leaves it out, and so does `info`."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(moe_ckpt)
    assert any(n.endswith("expert_bias") for n, _ in ref.named_buffers())
    assert describe(moe_ckpt)["parameters"]["total"] == ref.num_parameters()


def test_sharded_checkpoint(sharded_ckpt: Path) -> None:
    d = describe(sharded_ckpt)
    shards = sorted(p.name for p in sharded_ckpt.glob("*.safetensors"))
    assert len(shards) > 6
    assert d["parameters"]["total"] == sum(_numels(sharded_ckpt).values())
    names = [f["name"] for f in d["files"]]
    assert set(shards) <= set(names) and "model.safetensors.index.json" in names
    lines = plain_lines(d)
    # a long run of shards is one row in human output, with their summed size
    shard_bytes = sum((sharded_ckpt / s).stat().st_size for s in shards)
    assert f"shards: {len(shards)} safetensors files, {human_bytes(shard_bytes)}" in lines
    assert not any(line.startswith(("file model-00001", "file shards")) for line in lines)
    assert "file model.safetensors.index.json: " + human_bytes(
        (sharded_ckpt / "model.safetensors.index.json").stat().st_size) in lines


def test_bf16_checkpoint(bf16_ckpt: Path) -> None:
    d = describe(bf16_ckpt)
    total = d["parameters"]["total"]
    assert d["dtypes"] == {"BF16": total}
    assert d["memory"]["weights_stored_bytes"] == d["memory"]["weights_bf16_bytes"] == total * 2
    lines = plain_lines(d)
    assert "weights: " + human_bytes(total * 2) + " (BF16)" in lines  # one row: bf16 is how it is stored
    assert [line.split(":")[0] for line in lines].count("weights") == 1
    assert not any(line.lower().startswith("weights (") for line in lines)


def test_one_weights_row_says_both_sizes_when_stored_otherwise(dense_ckpt: Path, moe_ckpt: Path) -> None:
    """A float32 checkpoint: its size as stored and in bf16 (what lfm2 runs), in one row; MoE likewise per token."""
    d = describe(dense_ckpt)
    mem = d["memory"]
    assert list(d["dtypes"]) == ["F32"]
    weights = [line for line in plain_lines(d) if line.startswith("weights")]
    assert weights == [f"weights: {human_bytes(mem['weights_stored_bytes'])} as stored (F32), "
                       f"{human_bytes(mem['weights_bf16_bytes'])} in bf16"]
    d = describe(moe_ckpt)
    mem = d["memory"]
    weights = [line for line in plain_lines(d) if line.startswith("weights")]
    assert weights == [
        f"weights: {human_bytes(mem['weights_stored_bytes'])} as stored (F32), "
        f"{human_bytes(mem['weights_bf16_bytes'])} in bf16",
        f"weights read per token: {human_bytes(mem['active_weights_stored_bytes_per_token'])} as stored (F32), "
        f"{human_bytes(mem['active_weights_bf16_bytes_per_token'])} in bf16"]


def test_tokens_and_chat_template(dense_ckpt: Path, tmp_path: Path) -> None:
    root = _copy(dense_ckpt, tmp_path)
    (root / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|startoftext|>", "lstrip": False},
        "eos_token": "<|im_end|>",
        "chat_template": "{{ messages }}",
    }))
    (root / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|pad|>", "eos_token": "<x>"}))
    tok = describe(root)["tokens"]
    assert tok["bos_token"] == "<|startoftext|>"
    assert tok["eos_token"] == "<|im_end|>"  # tokenizer_config.json wins over special_tokens_map.json
    assert tok["pad_token"] == "<|pad|>"
    assert tok["chat_template"] is True and tok["chat_template_source"] == "tokenizer_config.json"
    # chat_template.json belongs to processors: the tokenizer never reads it, so neither does info
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (root / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert describe(root)["tokens"]["chat_template"] is False
    (root / "chat_template.json").unlink()
    (root / "chat_template.jinja").write_text("{{ messages }}")
    d = describe(root)
    assert d["tokens"]["chat_template_source"] == "chat_template.jinja"
    assert "chat_template.jinja" in [f["name"] for f in d["files"]]
    lines = plain_lines(d)
    assert "eos token: <|im_end|> (id 7)" in lines
    assert "chat template: yes (chat_template.jinja)" in lines


def test_broken_tokenizer_config_is_reported_not_fatal(dense_ckpt: Path, tmp_path: Path) -> None:
    root = _copy(dense_ckpt, tmp_path)
    (root / "tokenizer_config.json").write_text("{not json")
    d = describe(root)
    assert d["tokens"]["chat_template"] is False
    assert len(d["problems"]) == 1 and "tokenizer_config.json" in d["problems"][0]


def test_mismatched_checkpoint_is_described_with_its_problem(dense_ckpt: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """Described as far as it can be, but the check fails, so the exit code says so (scripts see 1)."""
    root = _copy(dense_ckpt, tmp_path)
    edit_config(root, vocab_size=1024)
    result = runner.invoke(app, ["info", str(root)])
    assert result.exit_code == 1, result.output
    check = [line for line in result.stdout.splitlines() if line.startswith("check: ")]
    assert len(check) == 1 and "wrong shape" in check[0] and "embed_tokens" in check[0]
    code, out, err = run_main(["info", str(root)], monkeypatch, capsys)
    assert code == 1 and "architecture: LFM2" in out
    assert err.count("\n") == 1 and err.startswith("error: ") and "embed_tokens" in err


def test_plain_output_has_no_escape_codes(moe_ckpt: Path) -> None:
    result = runner.invoke(app, ["info", str(moe_ckpt), "--offline"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "\x1b" not in out
    lines = out.strip().splitlines()
    assert all(": " in line for line in lines)
    keys = [line.split(": ", 1)[0] for line in lines]
    assert len(keys) == len(set(keys))  # every key appears once, so `grep '^key:'` is safe
    assert "architecture: LFM2-MoE" in lines and "layout: CACC (C conv, A attention)" in lines
    assert "experts per token: 2" in lines


def test_json_output_is_the_description(moe_ckpt: Path) -> None:
    result = runner.invoke(app, ["info", str(moe_ckpt), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(describe(moe_ckpt)))


def test_table_rendering(dense_ckpt: Path) -> None:
    """The terminal table shows every section and value; token text is never read as rich markup."""
    from rich.console import Console

    from lfm2cli.loading.describe import sections
    from lfm2cli.terminal.render import print_sections

    d = describe(dense_ckpt)
    d["tokens"]["pad_token"] = "[PAD]"
    console = Console(record=True, width=100, force_terminal=True)
    print_sections(sections(d), console)
    text = console.export_text()
    for section in ("Model", "Layers", "Attention", "Feed-forward", "Tokens", "Files", "Memory"):
        assert section in text
    assert "[PAD] (id 0)" in text and "CACA" in text and "KV cache per 1,000 tokens" in text
    assert "to run, int4" in text and " --" not in text  # info has no --quantize: its rows name none


def _sparse_checkpoint(root: Path, raw: dict) -> Path:
    """A full-size checkpoint whose tensor data is a sparse hole: real headers, no real bytes."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(raw))
    header, offset = {}, 0
    for name, shape in expected_tensors(parse_config(raw)).items():
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    with (root / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return root


def test_real_size_model_without_real_weights(tmp_path: Path) -> None:
    """LFM2-1.2B's published shape gives its published parameter count, instantly."""
    raw = dict(model_type="lfm2", vocab_size=65536, hidden_size=2048, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, block_ff_dim=12288, block_multiple_of=256,
               block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=True,
               full_attn_idxs=[2, 5, 8, 10, 12, 14], max_position_embeddings=128000)
    root = _sparse_checkpoint(tmp_path / "lfm2-1.2b", raw)
    d = describe(root)
    assert d["parameters"]["total"] == 1_170_340_608
    assert d["layers"]["layout"] == "CCACCACCACACACAC"
    assert d["feed_forward"]["dense_ff_dim"] == 8192
    lines = plain_lines(d)
    assert "parameters: 1.17B (1,170,340,608)" in lines
    assert "weights: 2.34 GB (BF16)" in lines
    # 6 attention layers x 2 x 8 kv heads x 64 x 2 bytes x 1000 tokens
    assert "KV cache per 1,000 tokens (bf16): 12.3 MB" in lines


def test_human_units() -> None:
    assert human_count(1_170_340_608) == "1.17B"
    assert human_count(8_300_000_000) == "8.30B"
    assert human_count(354_000_000) == "354M"
    assert human_count(512) == "512"
    assert human_bytes(999) == "999 B"
    assert human_bytes(12_288_000) == "12.3 MB"
    assert human_bytes(16_700_000_000) == "16.7 GB"


def _broken(kind: str, dense_ckpt: Path, sharded_ckpt: Path, tmp_path: Path) -> tuple[Path, str]:
    """A broken checkpoint of the given kind and a phrase its error message must contain."""
    if kind == "no config":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "no config.json"
    if kind == "missing dir":
        return tmp_path / "nope", "nope"  # the resolver words this itself; the name must appear
    if kind == "shard missing":
        root = Path(shutil.copytree(sharded_ckpt, tmp_path / "ckpt"))
        (root / "model-00002-of-00023.safetensors").unlink()
        return root, "missing"
    root = _copy(dense_ckpt, tmp_path)
    if kind == "model_type":
        edit_config(root, model_type="llama")
        return root, "model_type 'llama' is not supported"
    if kind == "no weights":
        (root / "model.safetensors").unlink()
        return root, "no model.safetensors"
    assert kind == "truncated"
    weights = root / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return root, "truncated"


ERROR_KINDS = ["no config", "missing dir", "model_type", "no weights", "truncated", "shard missing"]


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_errors_are_one_line(kind: str, dense_ckpt: Path, sharded_ckpt: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    root, phrase = _broken(kind, dense_ckpt, sharded_ckpt, tmp_path)
    result = runner.invoke(app, ["info", str(root)])
    assert result.exit_code == 1
    assert isinstance(result.exception, Lfm2Error) and result.stdout == ""
    code, out, err = run_main(["info", str(root)], monkeypatch, capsys)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err
    assert "Traceback" not in err


def test_subprocess_never_imports_torch_and_pipes_plain_text(dense_ckpt: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "LFM2_DEBUG")}
    code = (
        "import sys\n"
        f"sys.argv = ['lfm2', 'info', {str(dense_ckpt)!r}, '--json']\n"
        "from lfm2cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'info imported torch'\n"
    )
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout)["parameters"]["total"] == sum(_numels(dense_ckpt).values())

    piped = subprocess.run([sys.executable, "-m", "lfm2cli", "info", str(dense_ckpt)], capture_output=True,
                           text=True, cwd=ROOT, env=env)
    assert piped.returncode == 0 and piped.stderr == ""
    assert "\x1b" not in piped.stdout
    assert piped.stdout.splitlines() == plain_lines(describe(dense_ckpt))


def test_plan_is_the_one_loading_follows(dense_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    """`--plan` adds the decode plan that loading with the same options follows, decided from the config alone;
    without it the JSON has no plan."""
    from lfm2cli.loading.loader import load

    code, out, _ = run_main(["info", str(dense_ckpt), "--plan", "--json", "--dtype", "float32", "--quantize",
                             "int8"], monkeypatch, capsys)
    assert code == 0
    lm = load(dense_ckpt, dtype="float32", quantize="int8", tokenizer=False)
    assert json.loads(out)["plan"] == lm.plan.table()
    assert {row["format"] for row in lm.plan.table() if row["part"] == "LM head"} == {"int8"}
    code, out, _ = run_main(["info", str(dense_ckpt), "--plan", "--dtype", "float32"], monkeypatch, capsys)
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("decode plan on this machine (cpu, fp32"))
    assert code == 0 and lines[start + 1].split()[:3] == ["part", "implementation", "format"]
    assert "one-token step" in out and "prefill" in out
    code, out, _ = run_main(["info", str(dense_ckpt), "--json"], monkeypatch, capsys)
    assert code == 0 and "plan" not in json.loads(out)


def test_failed_check_still_describes_then_exits_1(dense_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    """A weight stored as I8 is described (JSON for scripts), its problem listed, and the exit code is 1 with one
    stderr line naming the tensor, as `generate` refuses the same checkpoint."""
    import torch
    from safetensors.torch import load_file, save_file

    root = _copy(dense_ckpt, tmp_path)
    name = "model.layers.2.conv.in_proj.weight"
    tensors = load_file(root / "model.safetensors")
    tensors[name] = (tensors[name] * 100).round().clamp(-128, 127).to(torch.int8)
    save_file(tensors, root / "model.safetensors")
    code, out, err = run_main(["info", str(root), "--json"], monkeypatch, capsys)
    desc = json.loads(out)
    assert code == 1 and "I8" in desc["dtypes"]
    assert len(desc["problems"]) == 1 and f"{name} I8 in model.safetensors" in desc["problems"][0]
    assert err == f"error: {desc['problems'][0]}\n"


def test_healthy_checkpoint_with_tokenizer_passes_the_check(chat_ckpt: Path) -> None:
    """The check reads the tokenizer (its ids must fit the embedding table); a good one passes with exit 0."""
    result = runner.invoke(app, ["info", str(chat_ckpt)])
    assert result.exit_code == 0, result.output
    assert "check: ok" in result.stdout.splitlines()
