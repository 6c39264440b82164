"""The demo's devices each hold a different real task, as (user prompt, assistant answer) pairs.

- `math`: grade-school math word problems, a GSM8K subset shipped in `demo/data/` (MIT licence);
  answers show their working and end with `#### <number>`.
- `telemetry`: a sensor reading in words -> one line of JSON with fixed keys (generated).
- `code`: a small Python function from a one-line request (generated).

Each task keeps its own held-out examples (never given to a device) for the before/after eval
loss, and one prompt that the final report answers with the base alone and with the adapter.
Deterministic for a seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
GSM8K = DATA / "gsm8k-train-subset.jsonl"

Pair = tuple[str, str]  # (user prompt, assistant answer)


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    description: str
    train: tuple[Pair, ...]
    held_out: tuple[Pair, ...]
    prompt: str  # asked at the end, with the base alone and with the federated adapter


def _math(n: int, held: int, seed: int) -> Task:
    rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = np.random.default_rng(seed).permutation(len(rows))
    pairs = [(rows[i]["question"], rows[i]["answer"]) for i in order]
    prompt, _ = pairs[0]  # never trained on
    return Task(
        "math",
        "GSM8K word problems (shipped subset, MIT)",
        tuple(pairs[1 + held : 1 + held + n]),
        tuple(pairs[1 : 1 + held]),
        prompt,
    )


_PLACES = ["greenhouse", "cellar", "barn", "roof", "garage", "kitchen", "pump-house", "hive", "shed", "lab"]
_PHRASES = [
    "Sensor {id} reports {t} C, {h} % humidity and a battery at {b} %.",
    "Reading from {id}: temperature {t} degrees C, humidity {h} percent, battery {b} percent.",
    "{id} says it is {t} C with {h} % relative humidity; battery level {b} %.",
    "The {id} probe measured {t} C and {h} % humidity. Battery: {b} %.",
]


def _reading(rng: np.random.Generator) -> Pair:
    sensor = f"{_PLACES[int(rng.integers(len(_PLACES)))]}-{int(rng.integers(1, 10))}"
    t = round(float(rng.uniform(-5, 35)), 1)
    h, b = int(rng.integers(15, 95)), int(rng.integers(5, 100))
    text = _PHRASES[int(rng.integers(len(_PHRASES)))].format(id=sensor, t=t, h=h, b=b)
    answer = json.dumps({"sensor": sensor, "temperature_c": t, "humidity_pct": h, "battery_pct": b})
    return f"Convert this sensor reading to JSON: {text}", answer


_FUNCS = [
    ("add", "the sum of", "{a} + {b}"),
    ("subtract", "the difference of", "{a} - {b}"),
    ("multiply", "the product of", "{a} * {b}"),
    ("biggest", "the larger of", "max({a}, {b})"),
    ("smallest", "the smaller of", "min({a}, {b})"),
    ("average", "the mean of", "({a} + {b}) / 2"),
    ("distance", "the absolute difference of", "abs({a} - {b})"),
    ("power", "the power with base", "{a} ** {b}"),
    ("remainder", "the remainder of dividing", "{a} % {b}"),
    ("hypotenuse", "the hypotenuse for legs", "({a} * {a} + {b} * {b}) ** 0.5"),
    ("same", "whether they are equal:", "{a} == {b}"),
    ("divides", "whether one divides the other:", "{b} % {a} == 0"),
]
_NAMES = [("a", "b"), ("x", "y"), ("first", "second"), ("left", "right"), ("p", "q"), ("m", "n"), ("u", "v"),
          ("low", "high"), ("num1", "num2"), ("i", "j")]  # fmt: skip


def _function(rng: np.random.Generator) -> Pair:
    name, what, body = _FUNCS[int(rng.integers(len(_FUNCS)))]
    a, b = _NAMES[int(rng.integers(len(_NAMES)))]
    prompt = f"Write a Python function {name}({a}, {b}) that returns {what} {a} and {b}."
    return prompt, f"```python\ndef {name}({a}, {b}):\n    return {body.format(a=a, b=b)}\n```"


def _generated(name: str, description: str, make: Callable[[np.random.Generator], Pair], n: int, held: int,
               seed: int, prompt: str) -> Task:  # fmt: skip
    rng = np.random.default_rng(seed)
    seen: set[Pair] = set()
    pairs: list[Pair] = []
    for _ in range(50 * (n + held)):  # a small space (code) runs out of new pairs: fewer examples then
        if len(pairs) >= n + held:
            break
        p = make(rng)
        if p not in seen and p[0] != prompt:
            seen.add(p)
            pairs.append(p)
    return Task(name, description, tuple(pairs[held:]), tuple(pairs[:held]), prompt)


def tasks(n: int, held: int, seed: int = 0) -> tuple[Task, ...]:
    """The three tasks with `n` training and `held` held-out examples each."""
    return (
        _math(n, held, seed),
        _generated(
            "telemetry", "sensor readings to JSON (generated)", _reading, n, held, seed + 1,
            "Convert this sensor reading to JSON: Sensor attic-7 reports 23.4 C, 51 % humidity and a battery at 64 %.",
        ),
        _generated(
            "code", "small Python functions (generated)", _function, n, held, seed + 2,
            "Write a Python function biggest(x, y) that returns the larger of x and y.",
        ),
    )  # fmt: skip
