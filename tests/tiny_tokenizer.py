"""A tiny byte-level BPE tokenizer laid out like LFM2's, for tests.

It is trained on a built-in corpus (English plus accented, CJK and emoji text, so that streaming
decoders meet characters split across tokens) and written as `tokenizer.json`,
`tokenizer_config.json` and `special_tokens_map.json`, which both `lfm2cli.text.tokenizer` and
transformers' `AutoTokenizer` can load."""

from __future__ import annotations

import json
from pathlib import Path

# The control tokens of the published LFM2 tokenizer, in id order (0..13).
SPECIAL_TOKENS = [
    "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
    "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
    "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>",
]
BOS, EOS, PAD = "<|startoftext|>", "<|im_end|>", "<|pad|>"

SHARED_TEMPLATES = Path(__file__).resolve().parents[2] / "shared" / "assets" / "lfm2"

# Our own template in the LFM2 im_start/im_end format, used when the shared assets are absent.
BUILTIN_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- set ns = namespace(system='') -%}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "  {%- set ns.system = messages[0]['content'] -%}\n"
    "  {%- set messages = messages[1:] -%}\n"
    "{%- endif -%}\n"
    "{%- if tools -%}\n"
    "  {%- set ns.system = ns.system ~ ('\\n' if ns.system else '') ~ 'List of tools: <|tool_list_start|>[' -%}\n"
    "  {%- for t in tools -%}\n"
    "    {%- set ns.system = ns.system ~ (t if t is string else t | tojson) ~ ('' if loop.last else ', ') -%}\n"
    "  {%- endfor -%}\n"
    "  {%- set ns.system = ns.system ~ ']<|tool_list_end|>' -%}\n"
    "{%- endif -%}\n"
    "{%- if ns.system -%}\n"
    "  {{- '<|im_start|>system\\n' ~ ns.system ~ '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- for m in messages -%}\n"
    "  {%- set body = m['content'] if m['content'] is string else m['content'] | tojson -%}\n"
    "  {%- if m['role'] == 'tool' -%}\n"
    "    {%- set body = '<|tool_response_start|>' ~ body ~ '<|tool_response_end|>' -%}\n"
    "  {%- endif -%}\n"
    "  {{- '<|im_start|>' ~ m['role'] ~ '\\n' ~ body ~ '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)


def default_template() -> str:
    """The published LFM2 template when the shared assets are checked out, else our own equivalent."""
    shared = SHARED_TEMPLATES / "chat_template_lfm2.jinja"
    return shared.read_text(encoding="utf-8") if shared.is_file() else BUILTIN_TEMPLATE


DEFAULT = object()  # sentinel: "use default_template()"

CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model reads text as a sequence of tokens
and predicts the next one. Small models can run on a laptop, a phone or a single graphics card.
Liquid AI designed LFM2 as a hybrid of short convolutions and grouped-query attention layers, so that
it stays fast on ordinary hardware. The user asks a question; the assistant answers it politely.
What is the capital of France? The capital of France is Paris. How many legs does a spider have?
A spider has eight legs. Please write a short poem about the sea, the wind and the stars.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159. Code: def add(a, b): return a + b
{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}
Café, naïve, résumé, crème brûlée, façade, jalapeño, Straße, Ærøskøbing, smörgåsbord.
Ελληνικά, русский язык, العربية, हिन्दी.
日本語のテキストです。東京は日本の首都です。中文文本：北京是中国的首都。한국어 텍스트입니다.
Emoji: 🙂 😀 🚀 🌍 👍🏽 🎉 ❤️ 🐍 🤖 and flags 🇫🇷 🇯🇵.
"""


def make_tokenizer(path: Path, chat_template: str | None | object = DEFAULT, template_as_file: bool = False,
                   vocab_size: int = 400) -> Path:
    """Train and write the tiny tokenizer into `path` (created if needed) and return `path`.

    `chat_template=None` writes no template at all; `template_as_file` writes it to
    `chat_template.jinja` (the newer hub layout) instead of the `chat_template` config key."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size > 512:
        raise ValueError("the tiny checkpoints have 512 embeddings: vocab_size must be <= 512")
    template = default_template() if chat_template is DEFAULT else chat_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # Like the real tokenizer, encoding with special tokens prepends BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))

    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config: dict = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "use_default_system_prompt": False,
    }
    if template is not None:
        if template_as_file:
            (path / "chat_template.jinja").write_text(template, encoding="utf-8")
        else:
            config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    special_map = {
        name: {"content": tok_, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        for name, tok_ in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD))
    }
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    return path


def add_think_tokens(path: Path) -> tuple[int, int]:
    """Make `<think>`/`</think>` special tokens of the tokenizer in `path`, as in LFM2.5's tokenizer; their ids."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(path / "tokenizer.json"))
    backend.add_special_tokens([AddedToken("<think>", special=True, normalized=False),
                                AddedToken("</think>", special=True, normalized=False)])
    backend.save(str(path / "tokenizer.json"))
    return backend.token_to_id("<think>"), backend.token_to_id("</think>")
