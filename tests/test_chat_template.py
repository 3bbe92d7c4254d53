"""Our renderer must produce exactly the text transformers' apply_chat_template produces."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lfm2cli.errors import CheckpointError, GenerationError, TemplateError
from lfm2cli.text.chat_template import MAX_CHARS, compile_template, render
from lfm2cli.text.tokenizer import load_tokenizer
from tests.helpers import template_copy
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


# Hostile templates from issue 14, each with what its one error line must say.
HOSTILE = {
    "nested-loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "loop iterations and calls"),
    "huge-string": ("{{ 'x' * 10**10 }}", "10,000,000,000 characters"),
    "recursive-macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nested"),
    "huge-range": ("{% for i in range(10**9) %}{{ i }}{% endfor %}", "range of 1,000,000,000"),
    "empty": ("{% if false %}{{ bos_token }}{% endif %}", "rendered nothing"),
}


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


# Every template as chat_template.jinja; one limit and the empty rendering also from tokenizer_config.json.
LAYOUTS = [pytest.param(name, True, id=f"{name}-jinja-file") for name in HOSTILE] + [
    pytest.param(name, False, id=f"{name}-tokenizer-config") for name in ("recursive-macro", "empty")]


@pytest.mark.slow
@pytest.mark.parametrize("name, as_file", LAYOUTS)
def test_hostile_template_is_one_line_naming_its_file(chat_ckpt: Path, tmp_path: Path, name: str,
                                                      as_file: bool) -> None:
    template, says = HOSTILE[name]
    d = tmp_path / "ckpt"
    culprit = template_copy(chat_ckpt, d, template, as_file)
    before = _snapshot(d)
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "lfm2cli", "generate", str(d), "-p", "hello", "-n", "2",
                        "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "LFM2_DEBUG"})
    elapsed = time.monotonic() - start
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: the chat template in "), r.stderr
    assert str(culprit) in lines[0] and says in lines[0] and "prompt is empty" not in lines[0]
    assert _snapshot(d) == before  # the checkpoint is only read
    assert elapsed < 120  # unbounded, the nested loops alone would run for hours


TINY_CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, says", [
    pytest.param("{{ 'x' | center(1000000000) }}", "center", id="filter-width-folded-at-compile"),
    pytest.param("{{ 'x'.ljust(10**9) }}", "ljust", id="str-method-width"),
    pytest.param("{{ '%0999999999d' % 1 }}", "format", id="percent-format-width"),
    pytest.param("{{ '{:>999999999}'.format(1) }}", "format", id="str-format-width"),
    pytest.param("{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
                 "characters", id="doubling-concat"),
    pytest.param("{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
                 "items", id="doubling-list"),
    pytest.param("{% set s = 'x' * 1000000 %}{{ ([s] * 1000000) | join }}", "joined", id="join-of-references"),
    pytest.param("{% set s = 'x' * 1000000 %}{{ s.replace('x', s) }}", "characters", id="replace-growth"),
    pytest.param("{% macro m() %}{% for i in range(100000) %}{{ 'y' * 1000000 }}{% endfor %}{% endmacro %}"
                 "{{ m() | length }}", "wrote more than", id="output-in-macro"),
    pytest.param("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
                 "loop iterations", id="nested-loops-over-a-string"),
    pytest.param("{{ 7 ** 10000000 }}", "bits", id="huge-power"),
    pytest.param("{{ lipsum(1000000) }}", "lipsum", id="lipsum"),
])
def test_budget_stops_hostile_templates(template: str, says: str) -> None:
    start = time.monotonic()
    with pytest.raises(TemplateError) as e:
        render(template, TINY_CHAT, bos_token="<s>", eos_token="</s>", template_source="ckpt/chat_template.jinja")
    message = str(e.value)
    assert says in message and "ckpt/chat_template.jinja" in message and "\n" not in message
    assert time.monotonic() - start < 30


def test_budget_grows_with_the_conversation() -> None:
    """A conversation bigger than the fixed limits still renders: they scale with what the template is given."""
    big = "word " * (MAX_CHARS // 4)
    messages = [{"role": "user", "content": big}, {"role": "assistant", "content": big},
                {"role": "user", "content": "?"}]
    text = render(BUILTIN_TEMPLATE, messages, bos_token="<|startoftext|>", eos_token="<|im_end|>")
    assert text.count(big) == 2 and len(text) > 2 * MAX_CHARS


def test_template_errors_still_name_the_file() -> None:
    with pytest.raises(GenerationError, match="chat template in ckpt/tokenizer_config.json failed") as e:
        render("{{ 1 / 0 }}", TINY_CHAT, bos_token="", eos_token="", template_source="ckpt/tokenizer_config.json")
    assert "division by zero" in str(e.value)


def test_budget_leaves_big_numbers_in_text_alone() -> None:
    """Only widths and precisions are checked: numbers in the text, or formatted, are just numbers."""
    tpl = ("{{ 'call 1234567890 %s' % 'now' }}|{{ 'id=%d' | format(1234567890) }}|{{ '{} {}'.format(1, 10**9) }}"
           "|{{ 'a,b'.split(',', 10**12) | join('+') }}|{{ 'x' * 3 }}|{{ range(3) | list | length }}")
    assert render(tpl, TINY_CHAT, bos_token="", eos_token="") == (
        "call 1234567890 now|id=1234567890|1 1000000000|a+b|xxx|3")
