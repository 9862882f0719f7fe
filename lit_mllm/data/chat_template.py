"""The built-in chat template, for tokenizers that ship none (GPT-2) and for the tiny tokenizer.

It follows the seed project's layout: each turn is ``\\n<|role|>\\n`` + content, and an assistant
reply ends with the eos token, which is therefore supervised.
"""

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '\\n<|' + message['role'] + '|>\\n' + message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|assistant|>\\n' -}}{%- endif -%}"
)

ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
