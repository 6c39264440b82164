"""The model's chat format, for training texts and for prompts alike.

The demo trains on exactly what it later asks: each example is the conversation rendered with the
base model's own chat template (from the bundle's manifest; ChatML when the model has none). The
assistant turn's closing end-of-turn marker is left to the batcher, which appends the model's
end-of-sequence token (`<|im_end|>` for SmolLM2): so what is taught is "stop after the answer",
never "stop right after the prompt". (Training on short plain `Question: … Answer: …` texts that
each ended in end-of-sequence taught the adapter to end a plain prompt at once: the empty answer.)
"""

from __future__ import annotations

from typing import Any

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MARK = "\x00answer\x00"  # stands in for the answer to find where the template closes the turn


class ChatFormat:
    def __init__(self, template: str | None, eos_token: str | None) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # templates come from model files

        self.template = template or CHATML
        self._jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(self.template)
        self.eos_token = eos_token

    def _render(self, messages: list[dict[str, str]], generation: bool) -> str:
        extra: dict[str, Any] = {"bos_token": "", "eos_token": self.eos_token or ""}
        return str(self._jinja.render(messages=messages, add_generation_prompt=generation, **extra))

    def prompt(self, user: str) -> str:
        """What the model sees before it answers: ends with the assistant turn's opening."""
        return self._render([{"role": "user", "content": user}], True)

    def example(self, user: str, answer: str) -> str:
        """A training text: the prompt and the answer, the closing end-of-turn left to the batcher's EOS."""
        full = self._render([{"role": "user", "content": user}, {"role": "assistant", "content": _MARK}], False)
        head, _, closing = full.partition(_MARK)
        if self.eos_token and closing.lstrip().startswith(self.eos_token):
            closing = ""  # the batcher appends end-of-sequence right after the answer
        return head + answer + closing
