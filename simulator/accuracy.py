"""Task accuracy of a final adapter, as a hook the runner calls: GSM8K exact match.

The simulator never generates text itself; whoever runs it passes a callable that maps adapter
tensors to an accuracy in [0, 1] (`AccuracyHook`). `GenerationAccuracy` builds one from any
generation function (e.g. llama.cpp with the GGUF base and the adapter) and GSM8K-style records:
a prediction is right when the final number it states equals the number after `#### ` in the
reference answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignfed.errors import ConfigError

AccuracyHook = Callable[[Mapping[str, np.ndarray]], float]
Generate = Callable[[Mapping[str, np.ndarray], Sequence[str]], Sequence[str]]  # (adapter, prompts) -> completions

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer number of a GSM8K-style text: after the last `####` if there is one, else the last
    number in the text; commas removed, a trailing `.0…` dropped. None when there is no number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    number = found[0] if "####" in text else found[-1]
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number in ("-0", "") else number


def exact_match(prediction: str, reference: str) -> bool:
    want = final_number(reference)
    return want is not None and final_number(prediction) == want


@dataclass(frozen=True, slots=True)
class Problem:
    prompt: str
    answer: str  # the reference answer text (with `#### n`)


def gsm8k_problems(path: Path, n: int, *, seed: int = 0) -> list[Problem]:
    """n problems from a GSM8K JSONL file (`question`, `answer`), seeded sample, prompted in the
    same `Question: …\\nAnswer:` format `alignfed.text` trains on."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"accuracy: {path} does not exist")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "question" not in rec or "answer" not in rec:
            raise ConfigError(f"{path}:{lineno}: expected fields 'question' and 'answer', got {sorted(rec)}")
        records.append(rec)
    if not records:
        raise ConfigError(f"accuracy: {path} holds no records")
    pick = np.random.default_rng(seed).permutation(len(records))[:n]
    return [Problem(prompt=f"Question: {records[i]['question']}\nAnswer:", answer=records[i]["answer"]) for i in pick]


class GenerationAccuracy:
    """An `AccuracyHook`: exact-match accuracy of `generate`'s completions on `problems`."""

    def __init__(self, generate: Generate, problems: Sequence[Problem]) -> None:
        if not problems:
            raise ConfigError("accuracy: need at least one problem")
        self.generate = generate
        self.problems = list(problems)

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> float:
        completions = list(self.generate(tensors, [p.prompt for p in self.problems]))
        if len(completions) != len(self.problems):
            raise ValueError(f"accuracy: {len(self.problems)} prompts but {len(completions)} completions")
        hits = sum(exact_match(c, p.answer) for c, p in zip(completions, self.problems, strict=True))
        return hits / len(self.problems)


def llama_generate(bundle: Path, *, max_tokens: int = 160, threads: int = 2) -> Generate:
    """A `Generate` that answers with llama.cpp: the bundle's GGUF base plus the adapter as a runtime
    LoRA (written to a temporary GGUF per call), greedy decoding, one base load for all calls."""
    import tempfile

    from alignfed import manifest as mf
    from alignfed.gguf_adapter import write_lora_gguf
    from runtime.llama import Generator

    m = mf.load(bundle)
    gen = Generator(Path(bundle) / mf.BASE_GGUF, n_ctx=512, n_threads=threads)
    scratch = Path(tempfile.mkdtemp(prefix="alignfed-accuracy-"))

    def generate(tensors: Mapping[str, np.ndarray], prompts: Sequence[str]) -> list[str]:
        path = write_lora_gguf(scratch / "adapter.gguf", tensors, m.architecture, m.lora)
        gen.set_adapter(path)
        # stop at the next question so a completion holds one answer
        return [gen.generate(p, max_tokens=max_tokens).split("\nQuestion:")[0] for p in prompts]

    return generate
