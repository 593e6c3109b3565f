"""The model's answer to a query, computed one way for the accuracy table (`demo/model_eval.py`,
the README's numbers) and the explorer's prediction column.

A query is encoded as its gradients are extracted: a leading end-of-text token, then the prompt's
tokens, then the target's tokens encoded apart (so they never merge with the prompt's). The answer
is correct when greedy decoding reproduces the target's tokens exactly: with teacher forcing, the
argmax equals the target token at every target position (one forward pass per batch).
"""

from __future__ import annotations

from typing import NamedTuple


class Answer(NamedTuple):
    correct: bool
    probability: float  # p(target | prompt)
    guess: str  # the greedy tokens at the target's positions, decoded


def encode_query(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(end-of-text + prompt token ids, target token ids)."""
    lead = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return (
        lead + tokenizer(prompt, add_special_tokens=False)["input_ids"],
        tokenizer(target, add_special_tokens=False)["input_ids"],
    )


def greedy_answers(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[Answer]:
    """The model's answer to each (prompt, target), in order."""
    import torch

    from gradient_kernels.losses import per_example_loss, query_batch

    encoded = [encode_query(tokenizer, prompt, target) for prompt, target in pairs]
    # many Llama-style tokenizers define no pad token; padded positions are masked anyway
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    answers = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            batch = query_batch([p for p, _ in chunk], [t for _, t in chunk], pad)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
            probabilities = (-per_example_loss(logits, batch)).exp()
            guesses = logits[:, :-1].argmax(-1)  # the token at position t is predicted by the logits at t-1
            for row in range(len(chunk)):
                where = batch.target_mask[row, 1:].bool()
                guess = guesses[row][where].tolist()
                answers.append(
                    Answer(
                        guess == batch.input_ids[row, 1:][where].tolist(),
                        float(probabilities[row]),
                        tokenizer.decode(guess),
                    )
                )
    return answers
