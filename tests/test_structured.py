"""Constrained decoding (decoding/constraints.py): --schema, --format json, --tool-choice and the thinking budget,
driven through a real tiny model sampling at temperature 1, where only the grammar keeps the output valid."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest

from lfm2cli.decoding.constraints import choose_grammar, json_grammar, read_schema, tool_call_grammar
from lfm2cli.errors import UsageError
from tests.helpers import SCHEMAS, opening_template, run_main, thinking_copy

SEEDS = range(20)
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "Calendar.create_event", "parameters": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 12}, "day": {"type": "integer", "minimum": 1, "maximum": 31},
        "all_day": {"type": "boolean"}}, "required": ["title", "day"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "q": {"type": "string", "maxLength": 8}, "limit": {"type": "integer", "minimum": 1, "maximum": 9}}}}},
]


def _run(lm, grammar, seed: int, *, tools=None, max_tokens: int = 160, prompt: str = "Describe someone.", **kw):
    from lfm2cli.decoding.sampling import SamplingParams
    from lfm2cli.runs.local import TextRun
    from lfm2cli.runs.prompt import one_shot_prompt

    ids = one_shot_prompt(lm, prompt, tools=tools).ids
    run = TextRun(lm, ids, SamplingParams(temperature=1.0, min_p=0.0, seed=seed), max_tokens, grammar=grammar,
                  tools=tools, **kw)
    run.run()
    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_seed_gives_json_that_validates(name: str, lm) -> None:
    schema = SCHEMAS[name]
    grammar = json_grammar(schema)
    texts = set()
    for seed in SEEDS:
        run = _run(lm, grammar, seed)
        assert run.stats.finish_reason == "stop", (seed, run.text)
        jsonschema.validate(json.loads(run.text), schema)
        assert not run.incomplete
        texts.add(run.text)
    assert len(texts) > len(SEEDS) // 2  # sampled, not one canned answer


@pytest.mark.slow
def test_the_same_model_without_a_grammar_writes_no_json(lm) -> None:
    """The control: what makes the outputs above valid is the grammar, not the model."""
    from lfm2cli.decoding.sampling import SamplingParams
    from lfm2cli.runs.local import TextRun
    from lfm2cli.runs.prompt import one_shot_prompt

    ids = one_shot_prompt(lm, "Describe someone.").ids
    parsed = 0
    for seed in range(5):
        text = TextRun(lm, ids, SamplingParams(temperature=1.0, min_p=0.0, seed=seed), 60).run()
        try:
            json.loads(text)
            parsed += 1
        except ValueError:
            pass
    assert parsed == 0


@pytest.mark.slow
def test_format_json_is_always_an_object(lm) -> None:
    """Free-form strings may run past max_tokens on a random model: such a reply is flagged, every other parses."""
    grammar = json_grammar(None)
    complete = 0
    for seed in SEEDS:
        run = _run(lm, grammar, seed, max_tokens=300)
        if run.stats.finish_reason == "length":
            assert run.incomplete
            continue
        assert isinstance(json.loads(run.text), dict), run.text
        complete += 1
    assert complete >= len(SEEDS) // 2


@pytest.mark.slow
def test_json_is_written_in_one_style(lm) -> None:
    """Separators as json.dumps writes them, and no runs of whitespace between tokens."""
    for seed in range(5):
        text = _run(lm, json_grammar(SCHEMAS["nested"]), seed).text
        json.loads(text)
        bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # strings may hold any whitespace
        assert re.sub(r"([,:]) ", r"\1", bare) == "".join(bare.split()), text


@pytest.mark.slow
def test_required_tool_choice_always_gives_valid_calls(lm) -> None:
    grammar = tool_call_grammar(TOOLS)
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    seen = set()
    complete = 0
    for seed in SEEDS:
        run = _run(lm, grammar, seed, tools=TOOLS, prompt="What is the weather in Paris?", max_tokens=300)
        if run.stats.finish_reason == "length":  # a random model may list calls past max_tokens: flagged
            assert run.incomplete and not run.tool_calls
            continue
        complete += 1
        assert run.stats.finish_reason == "tool_calls", (seed, run.text, run.tool_errors)
        assert run.text == "" and not run.tool_errors
        for call in run.tool_calls:
            jsonschema.validate(call.arguments, by_name[call.name])
            seen.add(call.name)
    assert complete >= len(SEEDS) * 3 // 4
    assert {"Calendar.create_event", "now"} <= seen  # the dotted name and the argument-less one are reachable


@pytest.mark.slow
def test_without_parallel_calls_the_block_holds_one_call(lm) -> None:
    for seed in range(8):
        run = _run(lm, tool_call_grammar(TOOLS, parallel=False), seed, tools=TOOLS, max_tokens=300)
        assert run.stats.finish_reason == "tool_calls" and len(run.tool_calls) == 1


@pytest.mark.slow
def test_a_tool_whose_call_cannot_be_pythonic_is_called_in_json(lm) -> None:
    """`max-results=3` and `from=...` are no Python keyword arguments: those calls are forced in the JSON form."""
    tools = [{"type": "function", "function": {"name": "search-web", "parameters": {"type": "object", "properties": {
        "max-results": {"type": "integer", "minimum": 1, "maximum": 9}, "from": {"enum": ["a", "b"]}},
        "required": ["max-results", "from"]}}}]
    for seed in range(5):
        run = _run(lm, tool_call_grammar(tools, parallel=False), seed, tools=tools, max_tokens=200)
        assert run.stats.finish_reason == "tool_calls" and not run.tool_errors
        (call,) = run.tool_calls
        assert call.name == "search-web"
        jsonschema.validate(call.arguments, tools[0]["function"]["parameters"])


@pytest.mark.slow
def test_a_named_tool_choice_calls_only_that_tool(lm) -> None:
    grammar = choose_grammar(None, "text", TOOLS, "get_weather")
    for seed in range(8):
        run = _run(lm, grammar, seed, tools=TOOLS)
        assert run.tool_calls and {c.name for c in run.tool_calls} == {"get_weather"}
        assert all("city" in c.arguments for c in run.tool_calls)


@pytest.mark.slow
def test_a_reply_cut_before_the_json_is_complete_says_so(lm) -> None:
    run = _run(lm, json_grammar({"type": "string", "minLength": 200}), 0, max_tokens=8)
    assert run.stats.finish_reason == "length" and run.incomplete


# ---- thinking: the budget, and the grammar applying to the answer only

@pytest.fixture(scope="module")
def opening_lm(opening_ckpt: Path):
    from lfm2cli.loading.loader import load

    return load(opening_ckpt, device="cpu", dtype="float32")


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0, 1, 6])
def test_the_budget_closes_the_block_after_n_tokens(opening_lm, budget: int) -> None:
    """The template opened `<think>`; random weights never close it, so only the budget can."""
    close = opening_lm.tokenizer.special_tokens["</think>"]
    run = _run(opening_lm, None, 3, think=True, opened="<think>", think_budget=budget, max_tokens=30)
    assert run.tokens.index(close) == budget
    assert run.reasoning.strip() == opening_lm.tokenizer.decode(run.tokens[:budget]).strip()
    assert run.stats.generated_tokens == len(run.tokens)


def test_without_a_budget_the_block_stays_open(opening_lm) -> None:
    run = _run(opening_lm, None, 3, think=True, opened="<think>", max_tokens=30)
    assert opening_lm.tokenizer.special_tokens["</think>"] not in run.tokens
    assert run.text == "" and run.reasoning


@pytest.mark.slow
def test_the_grammar_leaves_the_reasoning_free_and_constrains_the_answer(opening_lm) -> None:
    schema = SCHEMAS["person"]
    for seed in range(8):
        run = _run(opening_lm, json_grammar(schema), seed, think=True, opened="<think>", think_budget=5)
        assert run.reasoning  # random text: nothing constrained it
        with pytest.raises(ValueError):
            json.loads(run.reasoning)
        jsonschema.validate(json.loads(run.text), schema)


@pytest.mark.slow
def test_a_model_may_still_open_its_block_under_a_grammar(chat_ckpt: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that wants to think (here: a sampler that always prefers `<think>`) opens its block first; the
    grammar then holds back nothing until the answer, and `<think>` cannot appear in the answer."""
    import lfm2cli.runs.local as textgen
    from lfm2cli.loading.loader import load

    lm = load(thinking_copy(chat_ckpt, tmp_path / "ckpt"), device="cpu", dtype="float32")
    think = lm.tokenizer.special_tokens["<think>"]

    class Eager(textgen.Sampler):
        def __call__(self, logits, generated=None):
            logits = logits.clone()
            logits[think] += 1000.0  # -inf stays -inf: only where the grammar allows it
            return super().__call__(logits, generated)

    monkeypatch.setattr(textgen, "Sampler", Eager)
    run = _run(lm, json_grammar(SCHEMAS["person"]), 0, think=True, think_budget=3)
    assert run.tokens[0] == think and run.tokens[1:4] == [think] * 3  # reasoning, unconstrained
    jsonschema.validate(json.loads(run.text), SCHEMAS["person"])


# ---- the command line

def _generate(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return run_main(["generate", *args], monkeypatch, capsys)


@pytest.mark.slow
def test_generate_schema_from_a_file_and_inline(chat_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    file = tmp_path / "schema.json"
    file.write_text(json.dumps(SCHEMAS["pattern"]))
    for seed, schema in [(1, str(file)), (2, json.dumps(SCHEMAS["pattern"]))]:
        code, out, err = _generate([str(chat_ckpt), "-p", "When?", "--schema", schema, "-t", "1", "--seed",
                                    str(seed)], monkeypatch, capsys)
        assert code == 0, err
        jsonschema.validate(json.loads(out), SCHEMAS["pattern"])


@pytest.mark.slow
def test_generate_format_json_in_a_pipe(chat_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    code, out, err = _generate([str(chat_ckpt), "-p", "Hi", "--format", "json", "-t", "1", "--seed", "4", "--json"],
                               monkeypatch, capsys)
    assert code == 0, err
    assert isinstance(json.loads(json.loads(out)["text"]), dict)


@pytest.mark.slow
def test_generate_tool_choice_required(chat_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    code, out, err = _generate([str(chat_ckpt), "-p", "Weather?", "--tools", str(tools), "--tool-choice",
                                "required", "-t", "1", "--seed", "0", "--json"], monkeypatch, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["finish_reason"] == "tool_calls" and data["tool_calls"] and data["text"] == ""
    names = {t["function"]["name"] for t in TOOLS}
    assert all(c["function"]["name"] in names for c in data["tool_calls"])


@pytest.mark.slow
def test_generate_think_budget(chat_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    path = thinking_copy(chat_ckpt, tmp_path / "ckpt", template=opening_template())
    code, out, err = _generate([str(path), "-p", "Hi", "--think-budget", "4", "--format", "json", "-t", "1",
                                "--seed", "2", "--json"], monkeypatch, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["reasoning"] and isinstance(json.loads(data["text"]), dict)


@pytest.mark.parametrize("args, message", [
    (["--tool-choice", "required"], "--tool-choice required needs --tools"),
    (["--format", "yaml"], "'--format': 'yaml' is not one of 'text', 'json'"),
    (["--schema", "{nope"], "--schema: not valid JSON"),
    (["--schema", "[1]"], "--schema: a JSON schema must be an object"),
    (["--schema", "missing.json"], "--schema missing.json: no such file"),
    (["--schema", '{"type": "string", "pattern": "(?=x)"}'], "--schema: cannot be enforced"),
    (["--think-budget", "-1"], "--think-budget -1: expected a number of tokens >= 0"),
])
def test_bad_requests_fail_in_one_line_before_the_model_loads(args: list[str], message: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _generate([str(tmp_path / "no-such-model"), "-p", "Hi", *args], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert message in err and "no-such-model" not in err
    assert "Traceback" not in err


def test_tool_choice_conflicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    code, _, err = _generate([str(tmp_path / "x"), "-p", "Hi", "--tools", str(tools), "--tool-choice", "required",
                              "--format", "json"], monkeypatch, capsys)
    assert code == 2 and "drop one" in err
    code, _, err = _generate([str(tmp_path / "x"), "-p", "Hi", "--tools", str(tools), "--tool-choice", "nope"],
                             monkeypatch, capsys)
    assert code == 2 and "no such tool" in err and "get_weather" in err


@pytest.mark.slow
def test_an_incomplete_answer_exits_1(chat_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    code, _, err = _generate([str(chat_ckpt), "-p", "Hi", "--schema", '{"type": "string", "minLength": 100}',
                              "-n", "5", "-t", "1", "--seed", "1"], monkeypatch, capsys)
    assert code == 1
    assert err.strip().splitlines()[-1] == ("error: the reply stopped at the max_tokens limit (5 tokens) before its "
                                            "--schema output was complete; raise --max-tokens")


def test_read_schema_reads_a_file_with_braces_in_its_name(tmp_path: Path) -> None:
    file = tmp_path / "s.json"
    file.write_text('{"type": "integer"}')
    assert read_schema(str(file)) == {"type": "integer"}
    assert read_schema(' {"type": "integer"} ') == {"type": "integer"}
    with pytest.raises(UsageError):
        read_schema(str(tmp_path))
