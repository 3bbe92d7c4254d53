"""`lfm2 serve`'s Responses API (`/v1/responses`): the same generation as the chat endpoint for the same
conversation, its stream events in OpenAI's order, function tools (forced calls, a tool loop sent back as items),
text.format, and the fields it cannot honour refused by name; driven with the official `openai` client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.helpers import MODEL, serving

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
# a sampled tiny model writes a call whole within this many tokens; one call, so the reply ends with it
SAMPLED: dict[str, Any] = {"temperature": 1, "max_output_tokens": 200, "parallel_tool_calls": False,
                           "extra_body": {"seed": 3}}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}


def _chat(client: openai.OpenAI, messages: list[dict[str, Any]], **fields: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, **GREEDY, **fields)


def test_text_is_the_chat_endpoints_reply(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, **GREEDY)
    chat = _chat(client, [{"role": "user", "content": QUESTION}])
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == chat.choices[0].message.content
    assert [item.type for item in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert (r.incomplete_details.reason if r.incomplete_details else None) == (
        "max_output_tokens" if r.status == "incomplete" else None)


def test_instructions_and_message_items_are_the_chat_messages(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, instructions="Answer in French.", max_output_tokens=12, input=[
        {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Paris."}]},
        {"role": "user", "content": "And of Spain?"}], **GREEDY)
    chat = _chat(client, [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": QUESTION},
                          {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_stream_events_come_in_order_and_add_up_to_the_reply(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, **GREEDY)
    events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, stream=True, **GREEDY))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas) and deltas
    assert kinds[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in deltas)
    assert text == whole.output_text == events[-4].text == events[-3].part.text
    item = events[-2].item
    assert item.id == events[2].item.id == deltas[0].item_id and item.content[0].text == text
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == whole.usage.output_tokens


def test_a_forced_function_call_is_a_function_call_item(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], **SAMPLED,
                                tool_choice={"type": "function", "name": "get_weather"})
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    arguments = json.loads(calls[0].arguments)
    assert isinstance(arguments, dict) and isinstance(arguments["city"], str)
    assert r.status == "completed"
    # streamed: the call's item and its arguments' events
    events = list(client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], stream=True,
                                          tool_choice="required", **SAMPLED))
    kinds = [e.type for e in events]
    assert kinds[-5:] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    done = events[-3]
    assert done.name == "get_weather" and isinstance(json.loads(done.arguments), dict)
    assert events[-1].response.output[-1].arguments == done.arguments


def test_a_tool_loop_sent_back_as_items_is_the_chat_conversation(client: openai.OpenAI) -> None:
    args = json.dumps({"city": "Paris"})
    r = client.responses.create(model=MODEL, tools=[WEATHER], max_output_tokens=12, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": args},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}], **GREEDY)
    chat = _chat(client, [{"role": "user", "content": "Weather in Paris?"},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": args}}]},
                          {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                           "content": "sunny, 21 C"}], tools=[CHAT_WEATHER])
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == (chat.choices[0].message.content or "")


def test_text_format_json_schema_shapes_the_reply(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="Is it?", max_output_tokens=40, **GREEDY,
                                text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    assert isinstance(json.loads(r.output_text)["ok"], bool)


@pytest.mark.parametrize("fields, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"input": 3}, "input"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, "tool_choice"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": 3}}}, "text.format"),
    ({"text": "json"}, "text"),
    ({"tools": [WEATHER], "tool_choice": "required", "text": {"format": {"type": "json_object"}}}, "tool_choice"),
])
def test_what_it_cannot_honour_is_a_400_naming_the_field(client: openai.OpenAI, fields: dict, param: str) -> None:
    body = {"input": QUESTION, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, **body)
    assert e.value.param == param


def test_fields_without_effect_are_accepted(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2, store=True, user="me",
                                metadata={"a": "b"}, truncation="disabled", reasoning=None)
    assert r.metadata == {"a": "b"} and r.output_text is not None


def test_reasoning_is_a_reasoning_item_before_the_message(opening_ckpt: Path) -> None:
    """The template opens the `<think>` block and random weights never close it: all of the reply is reasoning."""
    with serving(opening_ckpt) as running:
        client = running.client()
        r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, **GREEDY)
        chat = _chat(client, [{"role": "user", "content": QUESTION}])
        reasoning = chat.choices[0].message.model_extra["reasoning_content"]
        assert [item.type for item in r.output] == ["reasoning", "message"] and reasoning
        assert r.output[0].content[0].text == reasoning and r.output_text == ""
        assert r.usage.output_tokens_details.reasoning_tokens == r.usage.output_tokens == 12
        events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, stream=True,
                                              **GREEDY))
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(deltas) == reasoning
    kinds = [e.type for e in events if e.type != "response.reasoning_text.delta"]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added", "response.reasoning_text.done",
                     "response.content_part.done", "response.output_item.done",
                     "response.output_item.added", "response.content_part.added", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
