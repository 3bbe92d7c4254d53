"""Parity with the reference implementation (`transformers`) on tiny random checkpoints, for every
config variant real checkpoints use: full forward, prefill + decode, chunked prefill, greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lfm2cli.loading.loader import load
from tests.helpers import prompt
from tests.tiny import edit_config, make_checkpoint, reference_model

TOL = 1e-4
N_PROMPT, N_DECODE, N_GREEDY = 24, 16, 32

VARIANTS: dict[str, dict] = {
    "dense": {},
    "dense-attention-first-untied": dict(layer_types=["full_attention", "conv", "conv", "conv"],
                                         tie_word_embeddings=False),
    "dense-conv-bias-L4": dict(conv_bias=True, conv_L_cache=4),
    "dense-ffn-multiplier": dict(block_ffn_dim_multiplier=1.5, block_multiple_of=48),
    "dense-no-auto-adjust": dict(block_auto_adjust_ff_dim=False),
    "dense-all-attention-mha": dict(layer_types=["full_attention"] * 4, num_key_value_heads=4),
    "moe": dict(moe=True),
    "moe-no-expert-bias": dict(moe=True, use_expert_bias=False),
    "moe-no-norm-topk": dict(moe=True, norm_topk_prob=False),
    "moe-scaling": dict(moe=True, routed_scaling_factor=2.5),
    "moe-no-dense-layers": dict(moe=True, num_dense_layers=0),
    "moe-two-dense-layers-untied": dict(moe=True, num_dense_layers=2, tie_word_embeddings=False),
    "dense-sharded": dict(max_shard_size="40KB"),
    "moe-sharded": dict(moe=True, max_shard_size="40KB"),
    "dense-bf16-on-disk": dict(dtype="bfloat16"),
    "moe-bf16-on-disk": dict(moe=True, dtype="bfloat16"),
}


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    ours = load(path, device="cpu", dtype="float32", tokenizer=False).model
    return ours, reference_model(path, "float32"), path


@pytest.mark.slow
def test_full_forward_matches_reference(pair) -> None:
    ours, ref, _ = pair
    ids = prompt(N_PROMPT + N_DECODE)
    with torch.no_grad():
        expected = ref(ids).logits
    got = ours(ids, all_logits=True)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.slow
def test_prefill_then_decode_matches_reference(pair) -> None:
    ours, ref, _ = pair
    ids = prompt(N_PROMPT + N_DECODE)
    with torch.no_grad():
        expected = ref(ids).logits[0]
    cache = ours.new_cache()
    got = [ours(ids[:, :N_PROMPT], cache)[0]]
    for i in range(N_PROMPT, N_PROMPT + N_DECODE):
        got.append(ours(ids[:, i:i + 1], cache)[0])
    assert cache.pos == N_PROMPT + N_DECODE
    for j, logits in enumerate(got):
        assert (logits - expected[N_PROMPT - 1 + j]).abs().max().item() < TOL


@pytest.mark.slow
def test_chunked_prefill_matches_reference(pair) -> None:
    ours, ref, _ = pair
    ids = prompt(N_PROMPT + N_DECODE, seed=2)
    with torch.no_grad():
        expected = ref(ids).logits
    cache = ours.new_cache(capacity=8)  # also exercises the KV cache growing mid-prompt
    chunks = [ours(ids[:, a:a + 7], cache, all_logits=True) for a in range(0, ids.shape[1], 7)]
    assert (torch.cat(chunks, dim=1) - expected).abs().max().item() < TOL


@pytest.mark.slow
def test_greedy_continuation_matches_reference_generate(pair) -> None:
    ours, ref, _ = pair
    ids = prompt(12, seed=3)
    ref.generation_config.eos_token_id = None  # run the full length on both sides
    expected = ref.generate(ids, max_new_tokens=N_GREEDY, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    cache = ours.new_cache()
    logits = ours(ids, cache)
    got = []
    for _ in range(N_GREEDY):
        tok = int(logits.argmax(-1))
        got.append(tok)
        logits = ours(torch.tensor([[tok]]), cache)
    assert got == expected


def test_config_forms_old_checkpoints(tmp_path: Path) -> None:
    """Older checkpoints say full_attn_idxs, rope_theta, block_ff_dim and tie_embedding."""
    path = make_checkpoint(tmp_path / "c", intermediate_size=96)
    ref = reference_model(path)
    edit_config(path, layer_types=None, full_attn_idxs=[1, 3], rope_parameters=None, rope_theta=1_000_000.0,
                intermediate_size=12, block_ff_dim=96, tie_word_embeddings=None, tie_embedding=True)
    ours = load(path, device="cpu", dtype="float32", tokenizer=False)
    assert ours.config.layer_types == ("conv", "full_attention", "conv", "full_attention")
    ids = prompt(20)
    with torch.no_grad():
        expected = ref(ids).logits
    assert (ours.model(ids, all_logits=True) - expected).abs().max().item() < TOL


def test_moe_decode_reads_only_routed_experts(moe_ckpt: Path) -> None:
    """At decode time an MoE layer runs exactly top-k experts per token."""
    lm = load(moe_ckpt, device="cpu", dtype="float32", tokenizer=False)
    calls: list[int] = []
    moe_layers = [m for m in lm.model.modules() if type(m).__name__ == "SparseMoE"]
    hooks = [e.register_forward_hook(lambda mod, i, o, idx=k: calls.append(idx))
             for m in moe_layers for k, e in enumerate(m.experts)]
    cache = lm.model.new_cache()
    lm.model(prompt(10), cache)
    calls.clear()
    lm.model(torch.tensor([[5]]), cache)
    for h in hooks:
        h.remove()
    assert len(calls) == len(moe_layers) * lm.config.num_experts_per_tok


def test_cache_snapshot_restore_gives_identical_logits(dense_ckpt: Path) -> None:
    model = load(dense_ckpt, device="cpu", dtype="float32", tokenizer=False).model
    cache = model.new_cache()
    model(prompt(10), cache)
    snap = cache.snapshot()
    first = model(torch.tensor([[3, 4, 5]]), cache)
    model(torch.tensor([[9]]), cache)
    cache.restore(snap)
    assert cache.pos == 10
    again = model(torch.tensor([[3, 4, 5]]), cache)
    assert torch.equal(first, again)


def test_stale_snapshot_is_refused(dense_ckpt: Path) -> None:
    model = load(dense_ckpt, device="cpu", dtype="float32", tokenizer=False).model
    cache = model.new_cache()
    model(prompt(10), cache)
    early = cache.snapshot()
    model(prompt(5, seed=4), cache)
    late = cache.snapshot()
    cache.restore(early)
    model(prompt(5, seed=5), cache)  # overwrites the positions `late` relied on
    with pytest.raises(ValueError, match="stale"):
        cache.restore(late)


def test_bf16_runtime_is_close_to_float32(dense_ckpt: Path) -> None:
    f32 = load(dense_ckpt, device="cpu", dtype="float32", tokenizer=False).model
    bf16 = load(dense_ckpt, device="cpu", dtype="bfloat16", tokenizer=False).model
    assert bf16.dtype == torch.bfloat16
    ids = prompt(16)
    a, b = f32(ids), bf16(ids)
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


BAD_CONFIG_VALUES = [
    ({"hidden_size": "sixty-four"}, "'hidden_size' is \"sixty-four\"; expected a whole number >= 1"),
    ({"hidden_size": True}, "'hidden_size' is true"),
    ({"num_hidden_layers": 2.5}, "'num_hidden_layers' is 2.5"),
    ({"num_attention_heads": 0}, "'num_attention_heads' is 0"),
    ({"num_key_value_heads": 3}, "not a multiple of 'num_key_value_heads' (3)"),
    ({"vocab_size": -1}, "'vocab_size' is -1"),
    ({"max_position_embeddings": None}, "'max_position_embeddings' is null"),
    ({"conv_L_cache": 0}, "'conv_L_cache' is 0"),
    ({"rope_parameters": [1]}, "'rope_parameters' is [1]; expected an object"),
    ({"rope_parameters": None, "rope_theta": float("nan")}, "'rope_theta' is nan; expected a number > 0"),
    ({"norm_eps": -1e-5}, "'norm_eps' is -1e-05"),
    ({"conv_bias": "no"}, "'conv_bias' is \"no\"; expected true or false"),
    ({"bos_token_id": -1}, "'bos_token_id' is -1; expected a token id"),
    ({"eos_token_id": "7"}, "'eos_token_id' is \"7\""),
    ({"layer_types": ["conv", "mamba", "conv", "conv"]}, "unknown layer type(s) mamba"),
    ({"layer_types": None, "full_attn_idxs": [9]}, "'full_attn_idxs' is [9]; expected a list of layer indices"),
    ({"block_ffn_dim_multiplier": "x"}, "'block_ffn_dim_multiplier' is \"x\""),
    ({"hidden_size": 2, "num_attention_heads": 4, "num_key_value_heads": 4}, "smaller than 'num_attention_heads'"),
    ({"dtype": 16}, "'dtype' is 16"),
]


@pytest.mark.parametrize("change,words", BAD_CONFIG_VALUES, ids=[str(c) for c, _ in BAD_CONFIG_VALUES])
def test_config_values_are_checked(change: dict, words: str) -> None:
    """A value of the wrong type or range is one ConfigError naming the file and the key, never a bare
    ValueError or TypeError from int(), nor a config that builds a broken model."""
    from lfm2cli.errors import ConfigError
    from lfm2cli.model.config import parse_config
    from tests.tiny import DENSE

    with pytest.raises(ConfigError) as info:
        parse_config({**DENSE, "model_type": "lfm2", **change}, source="/ckpt/config.json")
    message = str(info.value)
    assert message.startswith("/ckpt/config.json: ") and "\n" not in message
    assert words in message, message


def test_config_forms_that_stay_accepted() -> None:
    """Whole numbers written as floats, a null kv-head count or head_dim, and every published shape parse."""
    from lfm2cli.hub.known import KNOWN_CONFIGS
    from lfm2cli.model.config import parse_config
    from tests.tiny import DENSE, MOE

    cfg = parse_config({**DENSE, "model_type": "lfm2", "hidden_size": 64.0, "num_key_value_heads": None,
                        "head_dim": None, "bos_token_id": None})
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.bos_token_id) == (64, 4, 16, None)
    moe = parse_config({**MOE, "model_type": "lfm2_moe", "routed_scaling_factor": None})
    assert moe.routed_scaling_factor == 1.0 and moe.num_experts_per_tok == 2
    for raw in KNOWN_CONFIGS.values():
        assert parse_config(raw).vocab_size in (65536, 128000)
