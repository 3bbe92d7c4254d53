"""Our renderer must produce exactly the text transformers' apply_chat_template produces."""

from __future__ import annotations

from pathlib import Path

import pytest

from lfm2cli.chat_template import compile_template, render
from lfm2cli.errors import CheckpointError, GenerationError
from lfm2cli.tokenizer import load_tokenizer
from tests.tiny_tokenizer import BUILTIN_TEMPLATE, SHARED_TEMPLATES, default_template, make_tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city — in °C <by default> & more",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "e.g. Zürich or 東京"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"name": "get_time", "description": "Time now", "parameters": {"type": "object", "properties": {}}}

CONVERSATIONS: dict[str, tuple[list[dict], list | None]] = {
    "plain": ([{"role": "user", "content": "What is C. elegans?"}], None),
    "system": ([{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Bonjour, ça va ? 🙂"}], None),
    "multi_turn": ([{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Tell me a joke.\nA short one."}], None),
    "tools": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER_TOOL, TIME_TOOL]),
    "tools_with_system": ([{"role": "system", "content": "Use tools when needed."},
                           {"role": "user", "content": "Weather in Paris?"}], [WEATHER_TOOL]),
    "tool_response": ([{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant",
                        "content": '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'},
                       {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'},
                       {"role": "assistant", "content": "It is 21 °C and clear."},
                       {"role": "user", "content": "Thanks"}], [WEATHER_TOOL]),
    "tool_response_object": ([{"role": "user", "content": "Time?"},
                              {"role": "tool", "content": {"time": "12:00", "zone": "Europe/Zürich"}}], None),
    "thinking": ([{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "<think>Add them: 4.</think>\n\n  4"},
                  {"role": "user", "content": "and 3+3?"},
                  {"role": "assistant", "content": "<think>Six.</think> 6"}], None),
}


def _template_sources() -> list:
    params = [pytest.param("fallback", id="fallback"), pytest.param("builtin", id="builtin")]
    for name in ("chat_template_lfm2.jinja", "chat_template_lfm2.5.jinja"):
        params.append(pytest.param(name, id=name.removeprefix("chat_template_").removesuffix(".jinja")))
    return params


def _shared(name: str) -> str:
    file = SHARED_TEMPLATES / name
    if not file.is_file():
        pytest.skip(f"shared template assets not present ({SHARED_TEMPLATES})")
    return file.read_text(encoding="utf-8")


class _Both:
    """Renders with the builtin template and checks the no-template fallback says the same."""

    def __init__(self, with_template, without) -> None:
        self.a, self.b = with_template, without

    def apply_chat_template(self, *args, **kwargs) -> str:
        text = self.a.apply_chat_template(*args, **kwargs)
        assert self.b.apply_chat_template(*args, **kwargs) == text
        return text


@pytest.fixture(scope="module")
def setups(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per template source: (our tokenizer, the transformers tokenizer loading the same files)."""
    from transformers import AutoTokenizer

    cache: dict = {}

    def get(source: str):
        if source not in cache:
            if source == "fallback":
                # Ours has no template; transformers renders the tiny tokenizer's LFM2 template instead.
                ours = load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("none"), chat_template=None))
                theirs = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("dflt")))
                assert theirs.chat_template == default_template()
            elif source == "builtin":
                # The tiny tokenizer's own template (used when the shared assets are absent).
                d = make_tokenizer(tmp_path_factory.mktemp("b"), chat_template=BUILTIN_TEMPLATE)
                ours, theirs = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
                fallback = load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("n"), chat_template=None))
                ours = _Both(ours, fallback)
            else:
                # One layout per template, so both layouts meet the real templates.
                d = make_tokenizer(tmp_path_factory.mktemp("t"), chat_template=_shared(source),
                                   template_as_file=source.endswith("lfm2.5.jinja"))
                ours, theirs = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
            cache[source] = (ours, theirs)
        return cache[source]

    return get


@pytest.mark.parametrize("gen_prompt", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("source", _template_sources())
def test_matches_transformers(setups, source: str, conv: str, gen_prompt: bool) -> None:
    ours, theirs = setups(source)
    messages, tools = CONVERSATIONS[conv]
    got = ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, tools=tools)
    want = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=gen_prompt, tokenize=False)
    assert got == want
    assert got.startswith("<|startoftext|>") and got.endswith("<|im_start|>assistant\n") == gen_prompt
    if tools:
        assert "get_weather" in got and "Zürich" in got  # tojson keeps non-ASCII as is


@pytest.mark.parametrize("keep", [False, True])
def test_lfm25_keep_past_thinking(setups, keep: bool) -> None:
    ours, theirs = setups("chat_template_lfm2.5.jinja")
    messages, _ = CONVERSATIONS["thinking"]
    got = ours.apply_chat_template(messages, keep_past_thinking=keep)
    assert got == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             keep_past_thinking=keep)
    assert ("Add them: 4." in got) == keep  # past assistant turn: thinking dropped unless kept
    assert "<|im_start|>assistant\n4<|im_end|>" in got or keep  # and the rest trimmed
    assert "<think>Six.</think> 6" in got  # the last assistant turn is always kept whole


def test_messages_are_not_modified(setups) -> None:
    ours, _ = setups("fallback")
    messages = [{"role": "user", "content": "hi", "name": None}]
    ours.apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "hi", "name": None}]


CUSTOM = (
    "{%- for m in messages -%}{% generation %}{{ m.content | tojson }}{% endgeneration %}"
    "{% if loop.index == 2 %}{% break %}{% endif %}{%- endfor -%}\n"
    "|{{ {'b': 1, 'a': ['<&>', 'é']} | tojson(indent=2, sort_keys=True) }}"
    "|{{ [1, 2] | tojson(separators=(',', ':')) }}|{{ 'é' | tojson(ensure_ascii=True) }}"
    "|{{ dict(x=1).x }}|{{ pad_token }}|{{ custom_flag }}|{{ strftime_now('%Y') | length }}"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}|{{ ns.n }}"
    "{%- if messages[0].thinking is defined %}|{{ messages[0].thinking }}{% endif %}"
    "\n{% if true %}\n  kept\n    {% endif %}\nend"  # trim_blocks and lstrip_blocks at work
)


def test_custom_template_features_match_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    d = make_tokenizer(tmp_path, chat_template=CUSTOM)
    ours, theirs = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    messages = [{"role": "user", "content": "a<b>", "reasoning_content": "hmm"},
                {"role": "assistant", "content": {"k": "ü"}}, {"role": "user", "content": "never"}]
    got = ours.apply_chat_template(messages, custom_flag="on")
    assert got == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, custom_flag="on")
    assert "never" not in got and '"<&>"' in got and '"\\u00e9"' in got and "|<|pad|>|on|4|3|hmm" in got
    assert got.endswith("hmm  kept\nend")


def test_syntax_error_is_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="chat template is invalid") as e:
        compile_template("{% for m in messages %}{{ m }")
    assert "\n" not in str(e.value)


def test_raise_exception_is_generation_error() -> None:
    tpl = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must\nstart with user') }}{% endif %}ok"
    assert render(tpl, [{"role": "user", "content": "x"}], bos_token="<s>", eos_token="</s>") == "ok"
    with pytest.raises(GenerationError) as e:
        render(tpl, [{"role": "assistant", "content": "x"}], bos_token="<s>", eos_token="</s>")
    assert "Conversation must start with user" in str(e.value) and "\n" not in str(e.value)


def test_sandbox_blocks_unsafe_access() -> None:
    for tpl in ("{{ messages.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}"):
        with pytest.raises(GenerationError):
            render(tpl, [{"role": "user", "content": "x"}], bos_token="", eos_token="")


def test_template_compiled_once() -> None:
    tpl = "{{ bos_token }}{{ messages | length }}"
    assert compile_template(tpl) is compile_template(tpl)
    assert render(tpl, [{"role": "user", "content": "x"}], bos_token="B", eos_token="E") == "B1"


def test_empty_conversation_is_an_error() -> None:
    with pytest.raises(GenerationError):
        render(None, [], bos_token="<|startoftext|>", eos_token="<|im_end|>")
