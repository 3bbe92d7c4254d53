"""Tools and structured output in `lfm2 chat`: `--functions` (the tool loop: calls shown, confirmed or declined, run,
answered; the round limit; Ctrl-C), `--tool-choice`, `--schema`/`--format json`, `--think-budget`, and what history,
`--resume`, the recap and the exports make of tool calls and results.

The end-to-end tests run the real CLI on the tiny chat checkpoint, where only the grammar makes the model call a
tool; the loop tests script the sampler (tests/helpers.Script) so that every reply is a call."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jsonschema
import pytest
from rich.console import Console
from typer.testing import CliRunner

import lfm2cli.runs.local as textgen
from lfm2cli.chat.input import LineInput
from lfm2cli.chat.repl import MAX_TOOL_ROUNDS, ChatLoop, ChatUI
from lfm2cli.chat.session import ChatSession
from lfm2cli.cli import app
from lfm2cli.decoding.sampling import SamplingParams
from lfm2cli.loading.loader import LoadedModel
from lfm2cli.reply.functions import load_functions
from lfm2cli.reply.toolcalls import TOOL_CALL_END, TOOL_CALL_START
from lfm2cli.store.conversations import HistoryStore, to_json, to_markdown
from lfm2cli.text.tokenizer import load_tokenizer
from tests.helpers import SCHEMAS, Script, functions_file, run_main

runner = CliRunner()
GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0)
ARGS = ["--device", "cpu", "--dtype", "float32"]

FUNCTIONS = '''\
"""Tools for the tests: each leaves a trace in a file, so a test sees that it ran and with what."""
import json
from pathlib import Path
from typing import Literal

TRACE = Path({trace!r})


def get_weather(city: Literal["Paris", "Oslo"], celsius: bool = True) -> str:
    """The weather in a city.

    Args:
        city: which city
        celsius: degrees Celsius, else Fahrenheit
    """
    TRACE.write_text(json.dumps({{"city": city, "celsius": celsius}}))
    return f"18 degrees in {{city}}"


def explode() -> str:
    """A tool that always fails."""
    raise RuntimeError("the tool broke")


def count() -> str:
    """Counts its calls."""
    with open(str(TRACE) + ".count", "a") as f:
        f.write("x\\n")
    return "counted"
'''


@pytest.fixture
def tools_file(tmp_path: Path) -> Path:
    return functions_file(tmp_path, FUNCTIONS)


def trace(tools_file: Path) -> Path:
    return tools_file.parent / "trace.json"


def counted(tools_file: Path) -> int:
    path = Path(str(trace(tools_file)) + ".count")
    return len(path.read_text().splitlines()) if path.exists() else 0


def chat(ckpt: Path, *args: str, input: str, greedy: bool = True):
    return runner.invoke(app, ["chat", str(ckpt), *ARGS, *(["-t", "0"] if greedy else []), *args], input=input)


def only_conversation():
    with HistoryStore() as st:
        convs = st.list()
        assert len(convs) == 1
        return st.get(convs[0].id)


class Contexts:
    """Records what the model had in context when each reply began (decoded): the real sampler still samples."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
        self.tok = load_tokenizer(path)
        self.seen: list[str] = []
        outer = self

        class Recording(textgen.Sampler):
            first = True

            def __call__(self, logits, generated=None):
                if self.first:
                    self.first = False
                    outer.seen.append(outer.tok.decode(generated.tolist(), skip_special_tokens=False))
                return super().__call__(logits, generated)

        monkeypatch.setattr(textgen, "Sampler", Recording)


def record_final_prompts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The prompt the session would render next, taken as each chat ends."""
    prompts: list[str] = []
    farewell = ChatLoop.farewell

    def spy(self: ChatLoop) -> None:
        prompts.append(self.session.prompt_text())
        farewell(self)

    monkeypatch.setattr(ChatLoop, "farewell", spy)
    return prompts


# ---------------------------------------------------------------- end to end, the real model


@pytest.mark.slow
def test_required_tool_call_runs_and_is_answered_end_to_end_then_resume_renders_the_same_prompt(
        chat_ckpt: Path, home: Path, tools_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contexts = Contexts(monkeypatch, chat_ckpt)
    prompts = record_final_prompts(monkeypatch)
    result = chat(chat_ckpt, "--functions", str(tools_file), "--tool-choice", "get_weather", "--yes-tools",
                  "-n", "40", input="What is the weather in Paris?\n")
    assert result.exit_code == 0, result.output
    conv = only_conversation()
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    _, call_msg, tool_msg, answer = conv.messages

    # the call: produced under the grammar, parsed, stored in OpenAI's shape with the text the model wrote
    assert call_msg.finish_reason == "tool_calls" and len(call_msg.tool_calls) == 1
    entry = call_msg.tool_calls[0]
    assert entry["function"]["name"] == "get_weather"
    args = json.loads(entry["function"]["arguments"])
    assert TOOL_CALL_START in call_msg.raw_content and call_msg.raw_content.endswith(TOOL_CALL_END)
    # run with exactly those arguments
    assert json.loads(trace(tools_file).read_text()) == {"city": args["city"], "celsius": args.get("celsius", True)}
    # answered: the result is a tool message naming the call, and the model replied after reading it
    assert (tool_msg.tool_call_id, tool_msg.name) == (entry["id"], "get_weather")
    assert tool_msg.content == f"18 degrees in {args['city']}"
    assert answer.tool_calls is None and answer.finish_reason in ("stop", "length")
    assert len(contexts.seen) == 2
    assert f"<|tool_response_start|>{tool_msg.content}<|tool_response_end|>" in contexts.seen[1]
    assert "List of tools: <|tool_list_start|>[" in contexts.seen[0]  # the template got tools=
    # shown: the call and a short result on stderr; stdout holds only the replies' text
    assert f"tool call: get_weather(city=\"{args['city']}\"" in result.stderr
    assert f"→ 18 degrees in {args['city']}" in result.stderr
    assert "tool call" not in result.stdout and TOOL_CALL_START not in result.stdout

    # --resume: the template gets the same messages back, so the next prompt is the same text
    again = runner.invoke(app, ["chat", *ARGS, "--resume", conv.id, "--functions", str(tools_file)], input="")
    assert again.exit_code == 0, again.output
    assert len(prompts) == 2 and prompts[0] == prompts[1]
    assert f"{TOOL_CALL_START}[get_weather(city=" in prompts[1] and tool_msg.content in prompts[1]
    # the recap shows the last two messages readably: the result and the reply
    assert f"tool get_weather: {tool_msg.content}" in again.stderr

    # without --functions the model is offered none: said once
    bare = runner.invoke(app, ["chat", *ARGS, "--resume", conv.id], input="")
    assert bare.exit_code == 0 and "this conversation called tools (get_weather)" in bare.stderr


@pytest.mark.slow
def test_tool_choice_required_calls_runs_and_answers_whichever_tool_the_model_picks(
        chat_ckpt: Path, home: Path, tools_file: Path) -> None:
    """`required` leaves the choice of tool to the model (sampled here): every call it makes is parsed, run (or
    fails into an error result), answered by a tool message with its id, and the model replies after them."""
    result = chat(chat_ckpt, "--functions", str(tools_file), "--tool-choice", "required", "--yes-tools",
                  "-t", "1", "--seed", "1", "-n", "200", input="What is the weather in Paris?\n", greedy=False)
    assert result.exit_code == 0, result.output
    conv = only_conversation()
    roles = [m.role for m in conv.messages]
    call_msg = conv.messages[1]
    assert roles[:2] == ["user", "assistant"] and call_msg.finish_reason == "tool_calls" and call_msg.tool_calls
    n = len(call_msg.tool_calls)
    tool_msgs = conv.messages[2:2 + n]
    assert [m.role for m in tool_msgs] == ["tool"] * n
    assert [m.tool_call_id for m in tool_msgs] == [e["id"] for e in call_msg.tool_calls]
    results = {"get_weather": "18 degrees in ", "explode": "error: RuntimeError: the tool broke",
               "count": "counted"}
    for entry, msg in zip(call_msg.tool_calls, tool_msgs, strict=True):
        assert msg.name == entry["function"]["name"] and msg.content.startswith(results[msg.name])
    assert counted(tools_file) == sum(e["function"]["name"] == "count" for e in call_msg.tool_calls)
    assert roles[2 + n] == "assistant"  # the model went on after reading the results


def test_a_failing_tool_is_an_error_result_the_model_reads(chat_ckpt: Path, home: Path, tools_file: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    contexts = Contexts(monkeypatch, chat_ckpt)
    result = chat(chat_ckpt, "--functions", str(tools_file), "--tool-choice", "explode", "--yes-tools", "-n", "12",
                  input="Break something.\n")
    assert result.exit_code == 0, result.output
    conv = only_conversation()
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    tool_msg = conv.messages[2]
    assert tool_msg.content == "error: RuntimeError: the tool broke"
    assert tool_msg.tool_call_id == conv.messages[1].tool_calls[0]["id"]
    assert tool_msg.content in contexts.seen[1]  # seen by the model
    assert "→ error: RuntimeError: the tool broke" in result.stderr and "Traceback" not in result.output


@pytest.mark.slow
def test_piped_chat_declines_calls_with_one_note(chat_ckpt: Path, home: Path, tools_file: Path) -> None:
    result = chat(chat_ckpt, "--functions", str(tools_file), "--tool-choice", "get_weather", "-n", "40",
                  input="Weather in Paris?\nAnd in Oslo?\n")
    assert result.exit_code == 0, result.output
    assert not trace(tools_file).exists()  # never ran
    conv = only_conversation()
    results = [m for m in conv.messages if m.role == "tool"]
    assert len(results) == 2
    assert all(m.content == "error: the user declined to run get_weather" for m in results)
    assert result.stderr.count("tool calls are declined") == 1 and "--yes-tools" in result.stderr
    # every call was answered and replied to
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"] * 2


# ---------------------------------------------------------------- the loop, scripted


def call_block(*calls: str) -> str:
    return f"{TOOL_CALL_START}[{', '.join(calls)}]{TOOL_CALL_END}"


def loop_session(lm: LoadedModel, store: HistoryStore, tools_file: Path, **kw) -> tuple[ChatSession, object]:
    functions = load_functions(tools_file)
    return ChatSession(lm, store, "tiny", GREEDY, 40, tools=functions.tools, **kw), functions


def run_loop(s: ChatSession, functions, lines: str, **kw) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    ui = ChatUI(Console(file=out, width=100), Console(file=err, width=300), plain=True)
    ChatLoop(s, LineInput(io.StringIO(lines)), ui, functions=functions, **kw).run()
    return out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_the_round_limit_stops_a_model_that_keeps_calling(chat_ckpt: Path, home: Path, tools_file: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, chat_ckpt, *[call_block("count()")] * (MAX_TOOL_ROUNDS + 3), "Done.")
    result = chat(chat_ckpt, "--functions", str(tools_file), "--yes-tools", input="Count!\nAgain\n")
    assert result.exit_code == 0, result.output
    assert counted(tools_file) == MAX_TOOL_ROUNDS + 2  # the limit is per message: the second one goes on
    conv = only_conversation()
    roles = [m.role for m in conv.messages]
    first = ["user"] + ["assistant", "tool"] * MAX_TOOL_ROUNDS + ["assistant"]
    assert roles == first + ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert conv.messages[len(first) - 1].tool_calls  # the calls that were not run are kept, unanswered
    assert result.stderr.count(f"stopped after {MAX_TOOL_ROUNDS} rounds of tool calls") == 1
    assert conv.messages[-1].content == "Done."
    from lfm2cli.commands.chat import MAX_TOOL_ROUNDS as in_help

    assert in_help == MAX_TOOL_ROUNDS


@pytest.mark.slow
def test_confirmation_yes_no_all(lm: LoadedModel, chat_ckpt: Path, store: HistoryStore, tools_file: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, chat_ckpt, call_block("count()", "count()"), call_block("count()"), "Done.")
    questions: list[str] = []
    answers = iter(["maybe\n", "n\n", "a\n"])

    def confirm(question: str) -> str | None:
        questions.append(question)
        return next(answers, None)

    s, functions = loop_session(lm, store, tools_file)
    out, err = run_loop(s, functions, "Count twice\n", confirm=confirm)
    assert questions == ["run count? [y]es, [n]o, [a]ll for this session: "] * 3  # "maybe" is asked again
    assert counted(tools_file) == 2  # declined, then yes to all: the third call is not asked about
    assert [m.content for m in s.messages if m.role == "tool"] == [
        "error: the user declined to run count", "counted", "counted"]
    assert out == "Done.\n" and "answer y, n or a" in err


@pytest.mark.slow
@pytest.mark.parametrize("where", ["confirmation", "tool"])
def test_ctrl_c_cancels_the_loop_and_keeps_what_was_stored(where: str, lm: LoadedModel, chat_ckpt: Path,
                                                           store: HistoryStore, tools_file: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, chat_ckpt, call_block("count()", "count()"), "Next answer.")
    asked = 0

    def confirm(question: str) -> str:
        nonlocal asked
        asked += 1
        if where == "confirmation" and asked == 2:
            raise KeyboardInterrupt
        return "y"

    s, functions = loop_session(lm, store, tools_file)
    if where == "tool":
        real = functions.call
        calls = 0

        def interrupted_second(call):
            nonlocal calls
            calls += 1
            if calls == 2:
                raise KeyboardInterrupt  # as Ctrl-C inside the tool's own code
            return real(call)

        monkeypatch.setattr(functions, "call", interrupted_second)
    out, err = run_loop(s, functions, "Count\nHello\n", confirm=confirm)
    assert "tool calls cancelled" in err
    roles = [m.role for m in store.get(s.conversation_id).messages]
    # the first call's result is kept, the model was not asked to go on, and the chat went on
    assert roles == ["user", "assistant", "tool", "user", "assistant"]
    assert out == "Next answer.\n"


def test_retry_after_tool_results_regenerates_the_answer(lm: LoadedModel, chat_ckpt: Path, store: HistoryStore,
                                                         tools_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, chat_ckpt, call_block("count()"), "First.", "Second.")
    s, functions = loop_session(lm, store, tools_file)
    out, _ = run_loop(s, functions, "Count\n/retry\n", yes_tools=True)
    assert out == "First.\nSecond.\n"
    assert [(m.role, m.content) for m in store.get(s.conversation_id).messages][2:] == [
        ("tool", "counted"), ("assistant", "Second.")]
    assert counted(tools_file) == 1  # the call was not made again


def test_stored_calls_without_their_text_replay_as_lfm2_blocks(lm: LoadedModel, store: HistoryStore,
                                                               tools_file: Path) -> None:
    """Calls saved by another client (OpenAI's shape, no raw text) reach the template as the block LFM2 writes."""
    conv = store.create_conversation("tiny")
    store.add_message(conv.id, "user", "Weather?")
    store.add_message(conv.id, "assistant", "", finish_reason="tool_calls", tool_calls=[
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}])
    store.add_message(conv.id, "tool", "-3 degrees", tool_call_id="c1", name="get_weather")
    s, _ = loop_session(lm, store, tools_file)
    s.load(conv.id)
    prompt = s.prompt_text()
    assert (f'<|im_start|>assistant\n{TOOL_CALL_START}[get_weather(city="Oslo")]{TOOL_CALL_END}<|im_end|>\n'
            "<|im_start|>tool\n<|tool_response_start|>-3 degrees<|tool_response_end|><|im_end|>\n"
            "<|im_start|>assistant\n") in prompt


def test_tools_command(chat_ckpt: Path, home: Path, tools_file: Path) -> None:
    result = chat(chat_ckpt, "--functions", str(tools_file), input="/tools\n")
    assert result.exit_code == 0, result.output
    assert "get_weather(city, celsius?)  The weather in a city." in result.stderr
    assert "explode()  A tool that always fails." in result.stderr and "declined" in result.stderr
    bare = chat(chat_ckpt, input="/tools\n")
    assert "no tools: start the chat with --functions FILE.py" in bare.stderr


# ---------------------------------------------------------------- history and exports


def test_history_show_and_exports_show_calls_and_results(home: Path) -> None:
    from lfm2cli.commands.history import render_conversation

    with HistoryStore() as st:
        conv = st.create_conversation("m")
        st.add_message(conv.id, "user", "Weather?")
        st.add_message(conv.id, "assistant", "Let me look.", finish_reason="tool_calls", raw_content="x",
                       tool_calls=[{"id": "c1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}])
        st.add_message(conv.id, "tool", "18 degrees ```", tool_call_id="c1", name="get_weather")
        st.add_message(conv.id, "assistant", "It is 18 degrees.", finish_reason="stop")
        got = st.get(conv.id)
    md = to_markdown(got)
    assert ('## Assistant\n\nLet me look.\n\n- tool call: `get_weather(city="Paris")`\n\n'
            "## Tool result: get_weather\n\n````text\n18 degrees ```\n````\n\n## Assistant") in md
    assert "tool_calls" not in md  # the finish reason is shown by the calls themselves
    data = json.loads(to_json(got))["messages"]
    assert data[1]["tool_calls"][0]["id"] == "c1" and data[2]["tool_call_id"] == "c1"
    buf = io.StringIO()
    render_conversation(Console(file=buf, width=100), got)
    shown = buf.getvalue()
    assert 'tool call: get_weather(city="Paris")' in shown and "tool result: get_weather" in shown
    assert shown.index("Let me look.") < shown.index("tool call") < shown.index("18 degrees") < shown.index("It is")
    piped = runner.invoke(app, ["history", "show", conv.id])
    assert piped.exit_code == 0 and "- tool call: `get_weather(city=\"Paris\")`" in piped.stdout


# ---------------------------------------------------------------- structured output and the thinking budget


@pytest.mark.slow
def test_schema_in_chat_gives_json_that_validates(chat_ckpt: Path, home: Path) -> None:
    schema = SCHEMAS["pattern"]
    for seed in range(4):
        result = chat(chat_ckpt, "--schema", json.dumps(schema), "-t", "1", "--seed", str(seed), "-n", "60",
                      "--plain", input="When?\nAnd then?\n", greedy=False)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert len(lines) == 2
        for line in lines:
            jsonschema.validate(json.loads(line), schema)
    with HistoryStore() as st:
        replies = [m for c in st.list() for m in st.get(c.id).messages if m.role == "assistant"]
    assert len(replies) == 8
    for m in replies:
        jsonschema.validate(json.loads(m.content), schema)
    fmt = chat(chat_ckpt, "--format", "json", "-t", "1", "--seed", "4", "-n", "60", input="Hi\n", greedy=False)
    assert fmt.exit_code == 0, fmt.output
    assert isinstance(json.loads(fmt.stdout), dict)


def test_schema_output_cut_short_fails_the_message(chat_ckpt: Path, home: Path) -> None:
    result = chat(chat_ckpt, "--schema", '{"type": "string", "minLength": 100}', "-n", "5", "-t", "1", "--seed",
                  "1", input="Hi\n", greedy=False)
    assert result.exit_code == 1
    assert "the reply stopped before its --schema output was complete; /set max_tokens N allows more" in result.stderr




@pytest.mark.slow
def test_think_budget_in_chat(opening_ckpt: Path, home: Path) -> None:
    close = load_tokenizer(opening_ckpt).special_tokens["</think>"]
    for budget in (None, 3):
        result = chat(opening_ckpt, "-n", "20", *(["--think-budget", str(budget)] if budget is not None else []),
                      input="Hello\n")
        assert result.exit_code == 0, result.output
    with HistoryStore() as st:
        unbounded, bounded = [st.get(c.id).messages[1] for c in reversed(st.list())]
    assert unbounded.reasoning and not unbounded.content  # never closed by itself
    assert "</think>" not in unbounded.raw_content
    # closed after 3 tokens of reasoning: the rest of the reply is its answer
    tok = load_tokenizer(opening_ckpt)
    raw_ids = tok.encode(bounded.raw_content)
    assert close in raw_ids and bounded.content.strip()
    # greedy both times: the same reasoning, cut after its first 3 tokens (the count includes the closing marker)
    assert bounded.reasoning and unbounded.reasoning.startswith(bounded.reasoning.rstrip())
    assert len(bounded.reasoning) < len(unbounded.reasoning)
    assert 3 < bounded.timings["reasoning_tokens"] <= 6


# ---------------------------------------------------------------- bad combinations


@pytest.mark.parametrize("args, message", [
    (["--tool-choice", "required"], "--tool-choice required needs --tools (or --functions in chat)"),
    (["--functions", "{tools}", "--tool-choice", "required", "--format", "json"], "drop one"),
    (["--functions", "{tools}", "--schema", '{"type": "object"}'], "so the model could never call one"),
    (["--functions", "{tools}", "--tool-choice", "nope"], "--tool-choice nope: no such tool"),
    (["--yes-tools"], "--yes-tools runs the calls of --functions FILE.py"),
    (["--functions", "missing.py"], "missing.py: no such file"),
    (["--format", "yaml"], "'--format': 'yaml' is not one of 'text', 'json'"),
    (["--schema", "{nope"], "--schema: not valid JSON"),
    (["--think-budget", "-1"], "--think-budget -1: expected a number of tokens >= 0"),
])
def test_bad_combinations_fail_in_one_line_before_the_model_loads(args: list[str], message: str, tmp_path: Path,
                                                                  tools_file: Path, home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    args = [a.replace("{tools}", str(tools_file)) for a in args]
    code, out, err = run_main(["chat", str(tmp_path / "no-such-model"), *args], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert message in err and "no-such-model" not in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
