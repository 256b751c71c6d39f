"""Chat templates: how SFT renders `messages` (objectives/sft_data.py) and what an exported tokenizer
carries as its `chat_template` (checkpoint/hf_tokenizer.py). One definition, so the two cannot drift."""

import json

TEMPLATES = {
    "chatml": ("<|im_start|>{role}\n", "<|im_end|>\n"),
    "plain": ("{role}: ", "\n"),
}


def jinja_chat_template(name: str) -> str:
    """`TEMPLATES[name]` as the Jinja `chat_template` of an HF tokenizer_config.json: the same text
    `render_example` tokenizes, or with `add_generation_prompt` the assistant header that
    `render_chat_prompt` ends with. The EOS that training appends after the last message is not in
    the template: the exported tokenizer never turns text into special tokens (split_special_tokens,
    so a literal "<eos>" in data encodes as in training), so a template could only render it as
    bytes. Append `tokenizer.eos_token_id` to the ids, as SFT does."""
    header, footer = TEMPLATES[name]
    before, after = (json.dumps(part) for part in header.split("{role}"))
    end = json.dumps(footer)
    return (
        "{%- for message in messages -%}"
        f"{{{{ {before} + message['role'] + {after} + message['content'] + {end} }}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {before} + 'assistant' + {after} }}}}"
        "{%- endif -%}"
    )
