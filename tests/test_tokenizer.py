from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm2cli.errors import CheckpointError
from lfm2cli.text.tokenizer import load_tokenizer
from tests.tiny_tokenizer import SPECIAL_TOKENS, default_template, make_tokenizer

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "Café naïve 🙂 日本語のテキスト 👍🏽 🇫🇷",
    "  leading spaces and\ttabs\nnew lines  ",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def test_special_tokens_and_ids(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    assert tok.special_tokens == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 7)
    assert tok.pad_token_id == 0
    assert tok.vocab_size == 400
    assert tok.decode([6], skip_special_tokens=False) == "<|im_start|>"
    ids = [i for text in TEXTS for i in tok.encode(text, add_special_tokens=True)]
    assert max(ids) < 512


@pytest.mark.parametrize("as_file", [False, True])
def test_template_layouts(tmp_path: Path, as_file: bool) -> None:
    d = make_tokenizer(tmp_path, template_as_file=as_file)
    assert (d / "chat_template.jinja").exists() == as_file
    in_config = "chat_template" in json.loads((d / "tokenizer_config.json").read_text())
    assert in_config is not as_file
    assert load_tokenizer(d).chat_template == default_template()


def test_template_file_wins_over_config_key(tmp_path: Path) -> None:
    d = make_tokenizer(tmp_path, chat_template="FROM CONFIG")
    (d / "chat_template.jinja").write_text("FROM FILE")
    assert load_tokenizer(d).chat_template == "FROM FILE"


def test_named_templates_in_config(tmp_path: Path) -> None:
    d = make_tokenizer(tmp_path, chat_template=None)
    cfg_file = d / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS{{ tools | length }}"},
                            {"name": "default", "template": "PLAIN"}]
    cfg_file.write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.chat_template == "PLAIN"
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "PLAIN"
    assert tok.apply_chat_template(msgs, tools=[{"name": "f"}]) == "TOOLS1"


def test_no_template_uses_lfm2_format(tmp_path: Path) -> None:
    tok = load_tokenizer(make_tokenizer(tmp_path, chat_template=None))
    assert tok.chat_template is None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|startoftext|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    d = make_tokenizer(tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(d)
    msg = str(e.value)
    assert str(d) in msg and "tokenizer.json" in msg and "\n" not in msg


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    d = make_tokenizer(tmp_path / "c")
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(d)
    (d / "tokenizer.json").unlink()
    make_tokenizer(d)
    (d / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(d)


def test_without_configs_falls_back_to_lfm2_tokens(tmp_path: Path) -> None:
    d = make_tokenizer(tmp_path)
    (d / "tokenizer_config.json").unlink()
    (d / "special_tokens_map.json").unlink()
    tok = load_tokenizer(d)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 7, 0)


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tok_dir: Path, text: str) -> None:
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    plain = text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert tok.decode(ids) == plain
    assert tok.decode(tok.encode(text, add_special_tokens=True)) == plain  # BOS is skipped
    assert tok.decode(tok.encode(text, add_special_tokens=True), skip_special_tokens=False) == "<|startoftext|>" + text


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers(tok_dir: Path, hf, text: str) -> None:
    tok = load_tokenizer(tok_dir)
    with_bos = tok.encode(text, add_special_tokens=True)
    assert with_bos == hf(text)["input_ids"]
    assert with_bos[0] == 1
    assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    for skip in (True, False):
        assert tok.decode(with_bos, skip_special_tokens=skip) == hf.decode(with_bos, skip_special_tokens=skip)


def test_chat_encoding_has_single_bos(tok_dir: Path, hf) -> None:
    tok = load_tokenizer(tok_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Wie geht's? 🙂"}]
    ids = tok.encode(tok.apply_chat_template(msgs))
    expected = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids == expected["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids[-3:-1] != [7, 7] and 6 in ids


# ---- long texts counted in pieces (issue 24; the real commands are in test_hostile_checkpoint.py)

@pytest.mark.slow
def test_long_text_that_fits_is_encoded_exactly(tok_dir: Path) -> None:
    """Counting in pieces only ever refuses what cannot fit: a long text whose tokens are one fewer than the
    limit is encoded exactly as without a limit, and one token more is refused."""
    from lfm2cli.errors import PromptTooLongError
    from lfm2cli.text.tokenizer import PIECE_CHARS

    tok = load_tokenizer(tok_dir)
    for text in (("Café naïve 🙂 the river\n" * 20_000), ("ab" * 100_000), (" " * 150_000 + "x")):
        assert len(text) > 2 * PIECE_CHARS
        whole = tok.encode(text)
        tok.max_tokens = len(whole) + 1
        assert tok.encode(text) == whole
        tok.max_tokens = len(whole) // 2
        with pytest.raises(PromptTooLongError, match=f"holds {len(whole) // 2:,}; shorten it$"):
            tok.encode(text)
        tok.max_tokens = None


@pytest.mark.parametrize("change, cause", [
    (lambda d: d.update(normalizer={"type": "Replace", "pattern": {"String": "a"}, "content": "b" * 5_000}),
     "content 5,000 characters long"),
    (lambda d: d.update(decoder={"type": "Replace", "pattern": {"Regex": "a"}, "content": "b"}),
     "the decoder's Replace matches a regex"),
    (lambda d: d["added_tokens"].append({"id": 999, "content": "q" * 600, "special": True}), "a token of 600"),
    (lambda d: d.update(post_processor={"type": "Sequence", "processors": [{"type": "ByteLevel"}] * 3_000}),
     "more than 4,096 values"),
])
def test_tokenizer_json_past_its_bounds_is_refused_unread(tok_dir: Path, tmp_path: Path, change, cause: str) -> None:
    import shutil

    root = Path(shutil.copytree(tok_dir, tmp_path / "tok"))
    data = json.loads((root / "tokenizer.json").read_text())
    change(data)
    (root / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=cause):
        load_tokenizer(root)
