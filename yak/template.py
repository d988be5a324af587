"""The one chat template of the toolkit: Llama 2 chat, ``<s>[INST] <<SYS>> ... <</SYS>> ... [/INST] answer </s>``.

It is written into every exported tokenizer's ``tokenizer_config.json`` as ``chat_template``, so training
(SFT), ``apply_chat_template``, the CLI, the server, vLLM and the GGUF export all format conversations the
same way. Llama 2's vocabulary has no chat special tokens: ``[INST]`` and ``<<SYS>>`` are plain text.
"""

from __future__ import annotations

import json

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer in the language of the question."

_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = __DEFAULT__ -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/... after an optional system message') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.index0 == 0 and system_message -%}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
    "{%- else -%}"
    "{%- set content = message['content'] -%}"
    "{%- endif -%}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{%- else -%}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def build_chat_template(system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """Return the Llama 2 chat template (Jinja) with ``system_prompt`` as the default system message.

    A conversation that starts with a ``system`` message overrides the default; an empty
    ``system_prompt`` means no ``<<SYS>>`` block unless the conversation brings one.
    """
    return _TEMPLATE.replace("__DEFAULT__", json.dumps(system_prompt, ensure_ascii=False))


LLAMA2_CHAT_TEMPLATE = build_chat_template()
