"""Llama 2 and Llama 3 chat prompts, as text and as token ids.

Llama 3 (meta-llama/llama3 `ChatFormat`, HF Meta-Llama-3-Instruct jinja template):
    <|begin_of_text|>{for each message: <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT.strip()<|eot_id|>}
    then, for generation, <|start_header_id|>assistant<|end_header_id|>\\n\\n
Llama 2 (meta-llama/llama `generation.py` chat_completion, HF Llama-2-chat jinja template):
    <s>[INST] <<SYS>>\\nSYSTEM\\n<</SYS>>\\n\\nUSER1 [/INST] ANSWER1 </s><s>[INST] USER2 [/INST]
    (the system block is glued in front of the first user message and the whole is stripped).
Token ids follow Meta: each piece of text is encoded on its own and bos / eos / header ids are inserted as ids,
so message text can never turn into control tokens.

A checkpoint's own Jinja template (`tokenizer_config.json` "chat_template" or `chat_template.jinja`, read by the
tokenizer.json tokenizer) is rendered as transformers renders it (sandboxed, trim_blocks, lstrip_blocks,
`raise_exception`, bos_token / eos_token); `encode_chat` then parses the template's special tokens, and refuses
messages whose text holds special-token text (which would otherwise become control tokens).
"""

ROLES = ("system", "user", "assistant")
LLAMA2_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _check_messages(messages) -> None:
    if not messages:
        raise ValueError("messages is empty")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"message {k} must be a dict with exactly the keys 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {k} has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {k} content must be str, got {type(m['content']).__name__}")
        if m["role"] == "system" and k != 0:
            raise ValueError(f"message {k} is a system message; only the first message may be one")


def _llama2_turns(messages, add_generation_prompt: bool) -> list[tuple[str, str | None]]:
    """(user text, answer text or None) per [INST] block, system folded into the first user text."""
    _check_messages(messages)
    for k, m in enumerate(messages):
        for tag in LLAMA2_TAGS:
            if tag in m["content"]:
                raise ValueError(f"message {k} contains the Llama 2 control tag {tag!r}, which is not allowed")
    if messages[0]["role"] == "system":
        if len(messages) < 2:
            raise ValueError("a Llama 2 system message must be followed by a user message")
        first = dict(messages[1], content=B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"])
        messages = [first] + list(messages[2:])
    for k, m in enumerate(messages):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"Llama 2 roles must alternate user/assistant/user/...; turn {k} is {m['role']!r}")
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise ValueError("the last message must be from the user when add_generation_prompt=True")
    users, answers = messages[::2], messages[1::2]
    return [(u["content"].strip(), a["content"].strip() if a else None)
            for u, a in zip(users, answers + [None] * (len(users) - len(answers)))]


def render_jinja(source: str, messages, add_generation_prompt: bool = True, bos_token: str = "",
                 eos_token: str = "") -> str:
    """A Hugging Face chat template (Jinja source) rendered for messages, as transformers' apply_chat_template."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the chat template refuses these messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:
        raise ValueError(f"the chat template cannot be rendered: {e}") from e


def apply_chat_template(messages, template: str = "llama3", add_generation_prompt: bool = True) -> str:
    """The prompt text for messages [{"role": "system"|"user"|"assistant", "content": str}, ...]."""
    if template == "llama3":
        _check_messages(messages)
        text = "<|begin_of_text|>"
        for m in messages:
            text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        if add_generation_prompt:
            text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return text
    if template == "llama2":
        text = ""
        for user, answer in _llama2_turns(messages, add_generation_prompt):
            text += f"<s>{B_INST} {user} {E_INST}"
            if answer is not None:
                text += f" {answer} </s>"
        return text
    raise ValueError(f"unknown chat template {template!r}; expected 'llama2' or 'llama3'")


def encode_chat(tokenizer, messages, template: str | None = "llama3", add_generation_prompt: bool = True) -> list[int]:
    """The prompt token ids for messages, built the way Meta's reference code builds them; template None: the
    tokenizer's own Jinja chat template (see the module docstring)."""
    if template is None:
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise ValueError("this tokenizer has no chat template; name one (llama2, llama3)")
        _check_messages(messages)
        for k, m in enumerate(messages):
            for s in tokenizer.special_tokens:
                if s in m["content"]:
                    raise ValueError(f"message {k} contains the special token text {s!r}, which is not allowed")
        name = {i: s for s, i in tokenizer.special_tokens.items()}
        text = render_jinja(source, messages, add_generation_prompt, name.get(tokenizer.bos_id, ""),
                            name.get(tokenizer.eos_id, ""))
        return tokenizer.encode(text, allowed_special="all")
    if template == "llama3":
        _check_messages(messages)
        specials = tokenizer.special_tokens
        for name in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
            if name not in specials:
                raise ValueError(f"the llama3 template needs the special token {name}, which this tokenizer lacks")

        def header(role):
            return [specials["<|start_header_id|>"], *tokenizer.encode(role), specials["<|end_header_id|>"],
                    *tokenizer.encode("\n\n")]

        ids = [specials["<|begin_of_text|>"]]
        for m in messages:
            ids += header(m["role"]) + tokenizer.encode(m["content"].strip()) + [specials["<|eot_id|>"]]
        if add_generation_prompt:
            ids += header("assistant")
        return ids
    if template == "llama2":
        ids = []
        for user, answer in _llama2_turns(messages, add_generation_prompt):
            if answer is None:
                ids += tokenizer.encode(f"{B_INST} {user} {E_INST}", bos=True)
            else:
                ids += tokenizer.encode(f"{B_INST} {user} {E_INST} {answer} ", bos=True, eos=True)
        return ids
    raise ValueError(f"unknown chat template {template!r}; expected 'llama2' or 'llama3'")
