"""Chat templates: turn a list of messages into prompt token ids with the tokenizer's own template.

    messages = [{"role": "system", "content": "..."}, {"role": "user", "content": "Hi"}]
    ids = chat_ids(tokenizer, messages)          # ends with the assistant's turn opened
    out = engine.generate([ids], params)[0]
    messages.append({"role": "assistant", "content": out.text})
"""

from __future__ import annotations


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use `fp4kit generate` with a plain prompt")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]
