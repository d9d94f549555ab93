"""How a conversation becomes a prompt: one rule for `rugpt chat`, `rugpt.Chat` and `/v1/chat/completions`.

A chat format is a Hugging Face chat template (Jinja over `messages`, each with a `role` — system,
user or assistant — and `content`) plus the strings where a reply ends besides end-of-text. The
template is, in order of preference: the one asked for (`--chat-template`: a `.jinja` file or the
template text), the tokenizer's own `chat_template`, or rugpt's default: the system text, then
«Пользователь: …» / «Ассистент: …» lines, ending with «Ассистент:» for the model to continue — the
plain transcript a GPT-2 model like ruGPT-3, trained on web text, continues best.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rugpt.errors import UsageError

USER_LABEL = "Пользователь:"
ASSISTANT_LABEL = "Ассистент:"
ROLES = ("system", "user", "assistant")

NEWLINE = "{{ '\\n' }}"  # an expression, so Jinja's whitespace control never eats it
DEFAULT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] | trim }}" + NEWLINE +
    "{%- elif message['role'] == 'user' -%}" + USER_LABEL + " {{ message['content'] | trim }}" + NEWLINE +
    "{%- else -%}" + ASSISTANT_LABEL + " {{ message['content'] | trim }}" + NEWLINE +
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT_LABEL + "{%- endif -%}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A chat template and the strings that end a reply (the next speaker's label)."""

    template: str
    stop: tuple[str, ...] = ()
    name: str = "rugpt"

    @classmethod
    def default(cls) -> ChatFormat:
        return cls(DEFAULT_TEMPLATE, ("\n" + USER_LABEL, "\n" + ASSISTANT_LABEL), "rugpt")

    @classmethod
    def resolve(cls, tokenizer, override: str | Path | None = None) -> ChatFormat:
        """The format asked for (a `.jinja` file or template text), else the tokenizer's own, else rugpt's."""
        if override is not None and str(override) not in ("", "rugpt"):
            text = str(override)
            if text.endswith((".jinja", ".j2")) or Path(text).is_file():
                try:
                    text = Path(text).read_text(encoding="utf-8")
                except OSError as exc:
                    raise UsageError(f"chat_template={str(override)!r} cannot be read: {exc.strerror}") from None
            if "{" not in text:
                raise UsageError(f"chat_template={str(override)!r} is neither a Jinja template nor a template file")
            return cls(text, (), "custom")
        if override is None and getattr(tokenizer, "chat_template", None):
            return cls(tokenizer.chat_template, (), "model")
        return cls.default()

    def render(self, tokenizer, messages: list[dict]) -> str:
        """The prompt the model continues: the conversation and the assistant's opening."""
        for number, message in enumerate(messages, 1):
            if message.get("role") not in ROLES:
                raise UsageError(f"message {number} has role={message.get('role')!r}; use one of {', '.join(ROLES)}")
        try:
            return tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # jinja2 raises its own error types for a broken or failing template
            raise UsageError(f"the {self.name} chat template failed on this conversation: {exc}") from None
