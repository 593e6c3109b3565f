"""Does the model know the facts? Greedy top-1 accuracy on the queries, per frequency bucket.

A query counts as correct when greedy decoding after the prompt reproduces the target's tokens
exactly, judged as the explorer judges it (`evaluation/answers.py`: the same encoding as the query
gradients, a leading end-of-text token included).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.answers import greedy_answers
from infra import storage

PROMPTS = ("prompt0", "prompt1", "prompt2")


@dataclass
class Accuracy:
    # bucket -> prompt field -> [correct, total]
    counts: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(lambda: [0, 0])))

    def add(self, bucket: int, prompt_field: str, correct: bool):
        cell = self.counts[bucket][prompt_field]
        cell[0] += int(correct)
        cell[1] += 1

    def top1(self, bucket: int, prompt_field: str = "prompt0") -> float:
        correct, total = self.counts[bucket][prompt_field]
        return correct / total if total else float("nan")

    def as_dict(self) -> dict:
        return {
            str(bucket): {p: {"top1": self.top1(bucket, p), "n": self.counts[bucket][p][1]} for p in PROMPTS}
            for bucket in sorted(self.counts)
        }

    def table(self) -> str:
        lines = ["bucket  n_facts  " + "  ".join(f"{p:>8}" for p in PROMPTS)]
        for bucket in sorted(self.counts):
            n = self.counts[bucket]["prompt0"][1]
            lines.append(f"{bucket:>6}  {n:>7}  " + "  ".join(f"{self.top1(bucket, p):>8.1%}" for p in PROMPTS))
        return "top-1 accuracy per frequency bucket (facts stated in ~N documents):\n" + "\n".join(lines)


def evaluate_checkpoint(checkpoint_dir: Path, queries_path: Path, batch_size: int = 64) -> Accuracy:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir).eval()
    queries = [json.loads(line) for line in storage.read_text(str(queries_path)).splitlines() if line.strip()]
    asked = [(q["frequency_bucket"], p) for q in queries for p in PROMPTS]
    answers = greedy_answers(model, tokenizer, [(q[p], q["target"]) for q in queries for p in PROMPTS], batch_size)
    accuracy = Accuracy()
    for (bucket, prompt_field), answer in zip(asked, answers):
        accuracy.add(bucket, prompt_field, answer.correct)
    return accuracy
