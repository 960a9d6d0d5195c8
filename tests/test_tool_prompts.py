"""Tool calls and tool results in chat prompts: through a template that knows tools, and through the documented
fallback for one that does not (Gemma 3's) and for the plain transcript."""

from __future__ import annotations

import json

import test_constrained

from offgridd.inference.grammar import TOOL_MARKER
from offgridd.inference.prompts import render_template, render_transcript

worker = test_constrained.worker  # the fixture: a real inference worker of the built-in model, one for this module

# Gemma 3's chat template as published with google/gemma-3-*-it (tokenizer_config.json); it has no tool role and
# refuses turns that do not alternate user/assistant
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")

# a ChatML template in the style of Hugging Face's tool-use templates (Qwen 2.5, Hermes): tools in the system turn,
# calls in <tool_call> tags, results in a "tool" role
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{%- endfor %}"
    "{%- if m.role == 'tool' %} [id {{ m.tool_call_id }}]{% endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "9 C, rain"},
]


def test_gemma3s_template_gets_tool_results_as_one_marked_user_turn_and_calls_in_the_grammar_form():
    prompt = render_template(GEMMA3_TEMPLATE, "<bos>", "<eos>", CONVERSATION, tools=[WEATHER]).text
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}},
             {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert prompt == (
        "<bos><start_of_turn>user\nYou are terse.\n\n"
        f"You can call these tools. To call one, reply with {TOOL_MARKER} followed by a JSON object "
        '{"name": <tool name>, "arguments": {...}}.\n'
        '- get_weather: Weather for a city Arguments: {"type": "object", "properties": {"city": {"type": "string"}}}'
        "\n\nWeather in Paris and Oslo?<end_of_turn>\n"
        f"<start_of_turn>model\n{TOOL_MARKER}{json.dumps(calls)}<end_of_turn>\n"
        "<start_of_turn>user\nTool result (get_weather, call call_1):\n18 C, sunny\n\n"
        "Tool result (get_weather, call call_2):\n9 C, rain<end_of_turn>\n<start_of_turn>model\n")


def test_a_user_turn_after_a_tool_result_joins_it_so_gemmas_roles_still_alternate():
    messages = [*CONVERSATION[1:4], {"role": "user", "content": "And tomorrow?"}]
    messages[1] = {**messages[1], "tool_calls": messages[1]["tool_calls"][:1]}
    prompt = render_template(GEMMA3_TEMPLATE, "<bos>", "<eos>", messages).text
    assert "Tool result (get_weather, call call_1):\n18 C, sunny\n\nAnd tomorrow?<end_of_turn>" in prompt
    assert f'{TOOL_MARKER}{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}' in prompt
    assert "You can call these tools" not in prompt  # no tools offered this time


def test_a_template_that_knows_tools_gets_them_and_the_messages_unchanged():
    prompt = render_template(TOOL_TEMPLATE, "", "<|im_end|>", CONVERSATION, tools=[WEATHER]).text
    assert prompt.startswith("<|im_start|>system\nTools: get_weather<|im_end|>")
    assert '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>' in prompt
    assert "<|im_start|>tool\n18 C, sunny [id call_1]<|im_end|>" in prompt
    assert "Tool result" not in prompt and "You can call these tools" not in prompt


def test_the_plain_transcript_writes_tool_results_as_marked_user_lines():
    prompt = render_transcript(CONVERSATION, tools=[WEATHER]).text
    assert prompt.startswith("You are terse.\n\nYou can call these tools.")
    assert f"\nAssistant: {TOOL_MARKER}[" in prompt
    assert "\nUser: Tool result (get_weather, call call_1):\n18 C, sunny\n\nTool result (get_weather, call call_2)" \
        in prompt and prompt.endswith("\nAssistant:")


def test_messages_without_tools_render_as_before():
    messages = [{"role": "user", "content": "Hi"}]
    assert render_template(GEMMA3_TEMPLATE, "<bos>", "<eos>", messages).text == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert render_transcript(messages).text.endswith("\nUser: Hi\nAssistant:")


def test_the_worker_answers_a_conversation_holding_tool_results(worker):
    run, = worker.run({"messages": CONVERSATION, "params": {"tools": [WEATHER], "max_tokens": 8, "temperature": 0}})
    assert run["end"]["op"] == "done" and run["end"]["completion_tokens"] > 0
