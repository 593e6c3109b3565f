"""trace: the proponents of any prompt and target, scored on the fly against the indexed lake.

    python -m jobs trace --prompt "Nagam Thifabairk is a citizen of" [--target " Sadon"] [--top-k 5]

The query's vector is computed with the same projection, optimizer correction and R^(-1/2) the
checkpoint's TrackStar scores used (found through the `runs` and `hessians` tables), every
`train_gradients` batch is scored with the score job's own vectorised code, and the top
proponents are printed with their text and the words that carry the most attribution. Without a
target, the model's own greedy continuation (to the end of the sentence) is traced. `TraceContext`
is also what the explorer uses for its heat maps and its trace page.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import torch

from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings, load_config
from infra.lake import Lake
from infra.names import check_names
from jobs.catalog import NotInLake, checkpoint_folder, latest_checkpoint_id, runs_of


class TraceContext:
    """Everything needed to score a new query exactly as `score --methods trackstar` did."""

    def __init__(self, lake: Lake, checkpoint_id: str | None = None, query_set: str | None = None):
        query_set = query_set or load_config().query_set
        check_names(checkpoint_id=checkpoint_id, query_set=query_set)
        self.lake, self.query_set = lake, query_set
        self.checkpoint_id = checkpoint_id or latest_checkpoint_id(lake)
        self.fingerprint = self._scored_fingerprint()

    def _scored_fingerprint(self) -> str:
        for _, config, counts in runs_of(self.lake, "score"):  # newest first
            if "trackstar" in config.get("methods", ()) and counts.get("checkpoint_id") == self.checkpoint_id:
                return counts["fingerprint"]
        raise NotInLake(f"no TrackStar scoring of {self.checkpoint_id} recorded in runs: run the score job first")

    @cached_property
    def checkpoint_dir(self) -> Path:
        return checkpoint_folder(self.lake, self.checkpoint_id)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.checkpoint_dir)

    @cached_property
    def projector(self):
        from transformers import AutoModelForCausalLM

        from gradient_kernels.hooks import GradientProjector
        from gradient_kernels.modules import weight_matrices
        from gradient_kernels.normalizers import normalizers_from_state
        from gradient_kernels.projection import ProjectionSpec
        from jobs.checkpoints import load_second_moments

        extraction = next(
            config
            for _, config, _ in runs_of(self.lake, "extract", succeeded_only=False)
            if config.get("fingerprint") == self.fingerprint
        )
        spec = ProjectionSpec(**extraction["spec"])
        model = AutoModelForCausalLM.from_pretrained(self.checkpoint_dir).eval()
        normalizers = (
            normalizers_from_state(load_second_moments(self.checkpoint_dir), weight_matrices(model), spec.normalizer)
            if spec.normalizer != "none"
            else {}
        )
        return GradientProjector(model, spec, normalizers)

    @cached_property
    def preconditioner(self):
        from gradient_kernels.scoring import Preconditioner
        from jobs.catalog import load_preconditioner

        blocks, _ = load_preconditioner(self.lake, self.checkpoint_id, self.query_set, self.fingerprint, "inverse_root")
        return Preconditioner(blocks)

    def query_vector(self, prompt: str, target: str) -> torch.Tensor:
        """The prepared (preconditioned, unit) vector of a new query."""
        from evaluation.answers import encode_query
        from gradient_kernels.losses import query_batch
        from gradient_kernels.scoring import prepare

        prompt_ids, target_ids = encode_query(self.tokenizer, prompt, target)
        if not target_ids:
            raise ValueError("the target is empty: nothing to trace")
        self._check_length(len(prompt_ids) + len(target_ids))
        batch = query_batch([prompt_ids], [target_ids], self.tokenizer.eos_token_id)
        return prepare(self.projector(batch), self.preconditioner)[0]

    def _check_length(self, tokens: int):
        limit = getattr(self.projector.model.config, "max_position_embeddings", None)
        if limit and tokens > limit:
            raise ValueError(f"prompt and target are {tokens} tokens; the model reads at most {limit}")

    def greedy_target(self, prompt: str, max_tokens: int = 8) -> str:
        """The model's greedy continuation of `prompt`: its next token, then more up to the end of the
        sentence (what it answers)."""
        from evaluation.answers import encode_query

        model = self.projector.model
        ids, _ = encode_query(self.tokenizer, prompt, "")
        device, new = next(model.parameters()).device, []
        with torch.no_grad():
            while len(new) < max_tokens:
                self._check_length(len(ids) + len(new) + 1)
                inputs = torch.tensor([ids + new], device=device)
                token = int(model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits[0, -1].argmax())
                ends = token == self.tokenizer.eos_token_id or re.search(r"[.!?\n]", self.tokenizer.decode([token]))
                if new and ends:
                    break
                new.append(token)
                if ends:  # the model ends the sentence at once: that is its answer
                    break
        return self.tokenizer.decode(new)

    def stored_query_vector(self, query_id: str) -> torch.Tensor:
        from gradient_kernels.scoring import prepare
        from jobs.score import query_vectors

        ids, vectors, _ = query_vectors(self.lake, self.query_set, self.checkpoint_id, self.fingerprint, 0)
        return prepare(vectors[ids.index(query_id) : ids.index(query_id) + 1], self.preconditioner)[0]

    def top_k(self, query: torch.Tensor, k: int) -> list[dict]:
        """Exact top-k over every stored training vector, with the score job's batch code."""
        from jobs.score import score_batches

        where = [("checkpoint_id", "=", self.checkpoint_id), ("fingerprint", "=", self.fingerprint)]
        ratio = load_config().outlier_proponent_ratio
        flagged = self.lake.read("train_outliers", filters=where).to_pylist()
        left_out = {(r["doc_id"], r["chunk"]) for r in flagged if r["norm"] >= ratio * r["median_norm"]}  # as score
        batches = (
            batch.filter(
                pa.array([key not in left_out for key in zip(batch["doc_id"].to_pylist(), batch["chunk"].to_pylist())])
            )
            if left_out
            else batch
            for batch in self.lake.read_batches(
                "train_gradients", filters=where, columns=["doc_id", "chunk", "vector", "dtype", "scale"], ahead=True
            )
        )
        best = next(score_batches(batches, query[None].numpy(), self.preconditioner.blocks, True, k, query.shape[0]))
        return sorted(best.to_pylist(), key=lambda r: (-r["score"], r["doc_id"], r["chunk"]))

    def token_contributions(self, query: torch.Tensor, doc_id: str, chunk: int) -> list[tuple[str, float]]:
        """[(token text, contribution)]: the chunk's tokens and what each adds to its score."""
        from gradient_kernels.attribution import token_contributions

        rows = self.lake.read("tokens", filters=[("doc_id", "=", doc_id), ("chunk", "=", chunk)], columns=["input_ids"])
        ids = rows["input_ids"][0].as_py()
        values = token_contributions(self.projector, ids, query, self.preconditioner).tolist()
        return [(self.tokenizer.decode([token]), value) for token, value in zip(ids, values)]


@dataclass
class TraceConfig:
    prompt: str = option("", help="the prompt to trace (required)")
    target: str | None = option(
        None, help="the continuation to trace (mind its leading space); default: the model's own answer"
    )
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    checkpoint_id: str | None = option(None, help="a scored checkpoint (default: the latest)")
    query_set: str = from_settings("query_set", help="whose task-mixed R to precondition with")
    top_k: int = option(5)


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, TraceConfig)


def main(args):
    args = config_from_args(TraceConfig, args)
    if not args.prompt:
        raise SystemExit("trace: give the prompt to trace (--prompt)")
    lake = Lake(args.lake)
    context = TraceContext(lake, args.checkpoint_id, args.query_set)
    target = args.target or context.greedy_target(args.prompt)
    query = context.query_vector(args.prompt, target)
    top = context.top_k(query, args.top_k)
    texts = lake.read("documents", filters=[("doc_id", "in", [r["doc_id"] for r in top])], columns=["doc_id", "text"])
    texts = dict(zip(texts["doc_id"].to_pylist(), texts["text"].to_pylist()))
    print(f"{args.prompt!r} → {target!r}: top {len(top)} proponents on {context.checkpoint_id}")
    for rank, row in enumerate(top, start=1):
        words = sorted(context.token_contributions(query, row["doc_id"], row["chunk"]), key=lambda t: -t[1])[:3]
        print(f"\n#{rank} score {row['score']:.4f}  {row['doc_id']} (chunk {row['chunk']})")
        print(f"   {texts.get(row['doc_id'], '')[:240]}")
        print("   carried by: " + ", ".join(f"{w.strip() or repr(w)} ({v:+.3f})" for w, v in words))
