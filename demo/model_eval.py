"""Does the model know the facts? Greedy top-1 accuracy on the queries, per frequency bucket.

A query counts as correct when greedy decoding after the prompt reproduces the target's tokens
exactly; with teacher forcing that is "argmax equals the target token at every target position",
one forward pass per batch.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from infra import storage

PROMPTS = ("prompt0", "prompt1", "prompt2")


def encode_prompt_target(tokenizer, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of prompt + target and the number of prompt tokens.

    Prompt and target are encoded apart, so the target's tokens never merge with the prompt's:
    the same split the query loss uses.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return prompt_ids + target_ids, len(prompt_ids)


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
        return {str(bucket): {p: {"top1": self.top1(bucket, p), "n": self.counts[bucket][p][1]} for p in PROMPTS}
                for bucket in sorted(self.counts)}

    def table(self) -> str:
        lines = ["bucket  n_facts  " + "  ".join(f"{p:>8}" for p in PROMPTS)]
        for bucket in sorted(self.counts):
            n = self.counts[bucket]["prompt0"][1]
            lines.append(f"{bucket:>6}  {n:>7}  " + "  ".join(f"{self.top1(bucket, p):>8.1%}" for p in PROMPTS))
        return "top-1 accuracy per frequency bucket (facts stated in ~N documents):\n" + "\n".join(lines)


def evaluate_checkpoint(checkpoint_dir: Path, queries_path: Path, batch_size: int = 64) -> Accuracy:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir).eval()
    queries = [json.loads(line) for line in storage.read_text(str(queries_path)).splitlines() if line.strip()]
    items = [(q["frequency_bucket"], p, *encode_prompt_target(tokenizer, q[p], q["target"]))
             for q in queries for p in PROMPTS]
    accuracy = Accuracy()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            width = max(len(ids) for _, _, ids, _ in batch)
            # many Llama-style tokenizers define no pad token; padded positions are masked anyway
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, _, ids, _) in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
            predicted = model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1)
            for row, (bucket, prompt_field, ids, n_prompt) in enumerate(batch):
                # the token at position t is predicted by the logits at t-1
                hits = predicted[row, n_prompt - 1:len(ids) - 1] == input_ids[row, n_prompt:len(ids)]
                accuracy.add(bucket, prompt_field, bool(hits.all()))
    return accuracy
