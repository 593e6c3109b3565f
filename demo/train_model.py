"""Train the embedded model: a byte-level BPE tokenizer and a small GPT-2, with DeepSpeed.

No weights can be downloaded here, so the embedded default trains its own model on the fact world.
`run(config)` (the driver side) trains the tokenizer, packs the corpus into token blocks and starts
`deepspeed` with CPU ranks; each rank runs `train_rank` (this module as `__main__`). Checkpoints are
saved at several steps in Hugging Face format with the optimizer state next to them:

    model/checkpoints/<checkpoint_id>/      (outside the `checkpoints` table's folder: see jobs.checkpoints)
        config.json, model.safetensors, tokenizer.json, ...   Hugging Face causal LM
        zero/                                                the DeepSpeed checkpoint (sharded states)
        optimizer.pt                                         consolidated second moments per parameter
        manifest.json                                        checkpoint_id, step, lr, optimizer, data seen

Adam-family training uses ZeRO stage 2. Adafactor (factored second moments, as the paper's models)
uses ZeRO stage 0: ZeRO flattens parameters, which would stop Adafactor from factoring them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
from datetime import datetime, timezone
import time
from dataclasses import dataclass
from pathlib import Path

from infra import storage
from jobs.launch import end_rank, init_rank, launch_ranks, rank_arguments
from jobs.c4_batches import EOS
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings, load_config
from infra import layout


@dataclass
class TrainConfig:
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    model_tag: str = option("gpt2-fact-world", cli=False)  # the checkpoint ids' prefix (the pipeline's --name)
    seed: int = from_settings("world_seed", help="seed of the model's initialisation and the training shuffles")
    # model size (GPT-2 style)
    n_layer: int = option(4, flags=["--layers"])
    n_embd: int = option(128, flags=["--width"])
    n_head: int = option(4, flags=["--heads"])
    context: int = option(128, help="tokens per training sequence (the chunks' length)")
    vocab_size: int = option(4096)
    # optimisation
    optimizer: str = option(
        "adam", choices=["adam", "adafactor"], help="adam: AdamW, ZeRO-2; adafactor: torch's, ZeRO-0"
    )
    lr: float = option(3e-3)
    warmup_steps: int = option(30)
    weight_decay: float = option(0.0)
    micro_batch: int = option(16, help="sequences of `context` tokens per rank and step")
    epochs: float = option(16.0)
    # save a checkpoint after these shares of training
    checkpoint_fractions: tuple = option((0.5, 0.75, 1.0), cli=False)
    ranks: int = option(2, help="DeepSpeed ranks")
    cpu_threads: int = from_settings(
        "cpu_threads", help="CPU threads per rank (0: the idle cores split among the ranks)"
    )
    max_steps: int | None = option(None, help="caps the step count")

    @property
    def model_dir(self) -> Path:
        return Path(layout.model(self.lake))


def read_corpus(raw_dir: Path) -> tuple[list[str], int]:
    """Texts of every C4 partition in file order, and how many lines were unreadable.

    Training only needs text; the tokenize job is the one that quarantines bad lines row by row.
    """
    texts, bad = [], 0
    files = sorted(raw_dir.glob("c4-*.json.gz"))
    if not files:
        raise FileNotFoundError(f"no C4 partitions (c4-*.json.gz) under {raw_dir}; run `python -m jobs world` first")
    for path in files:
        with gzip.open(path, "rb") as fh:
            for line in fh:
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                if isinstance(text, str) and text.strip():
                    texts.append(text)
                else:
                    bad += 1
    return texts, bad


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE (GPT-2's scheme) trained on the corpus, saved in Hugging Face format."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def pack_blocks(tokenizer, texts: list[str], context: int):
    """Documents joined by EOS and cut into blocks of `context` tokens (int32 tensor [N, context])."""
    import torch

    ids = []
    for encoding in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoding)
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // context
    return torch.tensor(ids[: n_blocks * context], dtype=torch.int32).view(n_blocks, context), len(ids)


def step_count(config: TrainConfig, n_blocks: int) -> int:
    """Optimizer steps of a run on `n_blocks` packed blocks: `epochs` passes of micro_batch × ranks blocks a step."""
    steps_per_epoch = max(1, n_blocks // (config.micro_batch * config.ranks))
    total_steps = max(1, int(round(config.epochs * steps_per_epoch)))
    return min(total_steps, config.max_steps) if config.max_steps else total_steps


def step_rows(n_blocks: int, total_steps: int, per_step: int, seed: int):
    """(step, rows of the packed blocks it trains on, all ranks together) for every step: a new
    shuffle each epoch, drawn from one generator seeded with `seed` (the same on every rank)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(n_blocks, generator=generator), 0
    for step in range(1, total_steps + 1):
        if cursor + per_step > len(order):
            order, cursor = torch.randperm(n_blocks, generator=generator), 0
        yield step, order[cursor : cursor + per_step]
        cursor += per_step


def deepspeed_config(config: TrainConfig, total_steps: int) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,  # our own progress lines instead
        "zero_optimization": {"stage": 2 if config.optimizer == "adam" else 0},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": config.warmup_steps,
                "warmup_type": "linear",
                "cos_min_ratio": 0.1,
            },
        },
    }
    if config.optimizer == "adam":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": config.lr,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": config.weight_decay,
                "torch_adam": True,
            },
        }
    else:
        ds["zero_allow_untested_optimizer"] = True
    return ds


def input_digest(raw_dir: Path, config: TrainConfig) -> str:
    """Names what a training run learns from: the raw partitions' bytes and the configuration."""
    import hashlib

    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for path in sorted(raw_dir.glob("c4-*.json.gz")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def trained_partitions(raw_dir: Path) -> dict[str, str]:
    """{partition file name: sha256} of the raw partitions a training run reads, kept in its summary so
    that a rerun can tell partitions added since (indexed with the model, not trained on) from a
    corpus that changed under it (`demo.reruns.model_choice`)."""
    from jobs.checkpoints import sha256_file

    return {path.name: sha256_file(path) for path in sorted(raw_dir.glob("c4-*.json.gz"))}


def run(config: TrainConfig) -> dict:
    """Tokenizer + packed data on this side, then `deepspeed` with `config.ranks` CPU ranks."""
    import torch

    if storage.is_s3(config.lake):
        return _train_for_s3(config)
    started = time.time()
    model_dir = config.model_dir
    digest = input_digest(Path(config.lake) / "raw", config)
    previous = Path(layout.train_summary(config.lake))
    if (
        previous.exists()
        and json.loads(previous.read_text()).get("input_digest") == digest
        and all(
            layout.checkpoint_path(config.lake, c).exists() for c in json.loads(previous.read_text())["checkpoints"]
        )
    ):
        print(
            f"[train-model] already trained on this corpus with this configuration ({digest[:12]}); "
            f"keeping {model_dir} and its checkpoints",
            flush=True,
        )
        return json.loads(previous.read_text())
    texts, bad_lines = read_corpus(Path(layout.raw(config.lake)))
    tokenizer = train_tokenizer(texts, config.vocab_size, Path(layout.tokenizer(config.lake)))
    blocks, n_tokens = pack_blocks(tokenizer, texts, config.context)
    torch.save(blocks, model_dir / "train_blocks.pt")
    total_steps = step_count(config, len(blocks))
    plan = {
        "config": dataclasses.asdict(config),
        "total_steps": total_steps,
        "n_documents": len(texts),
        "n_tokens": n_tokens,
        "n_blocks": len(blocks),
        "skipped_lines": bad_lines,
        "deepspeed": deepspeed_config(config, total_steps),
    }
    (model_dir / "plan.json").write_text(json.dumps(plan, indent=2))
    print(
        f"[train-model] corpus: {len(texts)} documents, {n_tokens} tokens, {len(blocks)} blocks of "
        f"{config.context}; {bad_lines} unreadable lines skipped; {total_steps} steps on {config.ranks} CPU ranks",
        flush=True,
    )

    launch_ranks("demo.train_model", str(model_dir / "plan.json"), config.ranks, config.cpu_threads)

    summary = json.loads(Path(layout.train_summary(config.lake)).read_text())
    summary.update(
        n_documents=len(texts),
        n_tokens=n_tokens,
        wall_seconds=round(time.time() - started, 1),
        input_digest=digest,
        partitions=trained_partitions(Path(layout.raw(config.lake))),
    )
    Path(layout.train_summary(config.lake)).write_text(json.dumps(summary, indent=2))
    return summary


def _train_for_s3(config: TrainConfig) -> dict:
    """Train in a local copy of the lake (DeepSpeed writes local files) kept under the cache, then
    upload the tokenizer, the training summary and the checkpoints beside the lake's tables."""
    local = storage.cache_path(config.lake, load_config().cache_dir) / "train"
    storage.download_prefix(layout.raw(config.lake), layout.raw(local))
    summary = run(dataclasses.replace(config, lake=str(local)))
    for folder in ("model/tokenizer", "model/checkpoints"):
        storage.upload_dir(local / folder, storage.join(config.lake, folder))
    storage.upload_file(layout.train_summary(local), layout.train_summary(config.lake))
    return summary


# ----------------------------------------------------------------------------- rank side


def build_model(config: TrainConfig, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.context,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(gpt_config)


def second_moments(engine, model, config: TrainConfig) -> dict:
    """The optimizer's second moments per named parameter, whole (gathered across ZeRO ranks).

    A collective call under ZeRO: every rank must make it.
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    state = {}
    for name, param in model.named_parameters():
        if config.optimizer == "adam":
            state[name] = {"exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").detach().cpu().clone()}
        else:
            held = engine.optimizer.state[param]
            keys = ("row_var", "col_var") if "row_var" in held else ("variance",)
            state[name] = {key: held[key].detach().cpu().clone() for key in keys}
    return state


def optimizer_step_count(engine, model, config: TrainConfig) -> int:
    if config.optimizer == "adam":
        return engine.global_steps
    return int(engine.optimizer.state[next(model.parameters())]["step"])


def save_checkpoint(engine, model, tokenizer_dir: Path, config: TrainConfig, step: int, tokens_seen: int):
    import shutil

    import torch
    import torch.distributed as dist

    checkpoint_id = f"{config.model_tag}-s{config.seed}-step{step:06d}"
    out = layout.checkpoints_path(config.lake) / checkpoint_id
    engine.save_checkpoint(str(out / "zero"), tag=f"step{step}")
    moments = second_moments(engine, model, config)
    if dist.get_rank() == 0:
        model.save_pretrained(out, safe_serialization=True)
        for item in tokenizer_dir.iterdir():
            shutil.copy(item, out / item.name)
        group = engine.optimizer.param_groups[0]
        torch.save(
            {
                "kind": config.optimizer,
                "step": optimizer_step_count(engine, model, config),
                "lr": group["lr"],
                "betas": list(group.get("betas", ())),
                "eps": group["eps"],
                "state": moments,
            },
            out / "optimizer.pt",
        )
        manifest = {
            "checkpoint_id": checkpoint_id,
            "step": step,
            "lr": group["lr"],
            "optimizer": config.optimizer,
            "optimizer_hparams": {k: v for k, v in group.items() if k != "params"},
            "data_seen_tokens": tokens_seen,
            "data_seen_sequences": tokens_seen // config.context,
            "model_tag": config.model_tag,
            "seed": config.seed,
            "zero_stage": 2 if config.optimizer == "adam" else 0,
            "zero_tag": f"step{step}",
            "world_size": dist.get_world_size(),
            # breaks a tie of steps with the checkpoints of an earlier model (a retrain)
            "saved_at": datetime.now(timezone.utc).isoformat(),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        print(f"[train-model] saved checkpoint {checkpoint_id} (lr={group['lr']:.2e})", flush=True)
    dist.barrier()
    return checkpoint_id


def train_rank(plan_path: str):
    import deepspeed
    import torch

    plan = json.loads(storage.read_bytes(plan_path))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in plan["config"].items() if k in fields})
    rank, world = init_rank()
    torch.manual_seed(config.seed)

    tokenizer_dir = Path(layout.tokenizer(config.lake))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_model(config, len(tokenizer))
    client_optimizer = None
    if config.optimizer == "adafactor":
        client_optimizer = torch.optim.Adafactor(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=client_optimizer, model_parameters=model.parameters(), config=plan["deepspeed"]
    )

    blocks = torch.load(config.model_dir / "train_blocks.pt").long()
    total_steps = plan["total_steps"]
    save_at = sorted({max(1, int(round(f * total_steps))) for f in config.checkpoint_fractions})
    per_step = config.micro_batch * world
    saved, started = [], time.time()
    for step, rows in step_rows(len(blocks), total_steps, per_step, config.seed):
        batch = blocks[rows[rank * config.micro_batch : (rank + 1) * config.micro_batch]]
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        if rank == 0 and (step % 20 == 0 or step == total_steps):
            rate = step * per_step * config.context / (time.time() - started)
            eta = (total_steps - step) * (time.time() - started) / step
            print(
                f"[train-model] step {step}/{total_steps} loss {loss.item():.3f} "
                f"lr {engine.get_lr()[0]:.2e} {rate:,.0f} tok/s ETA {eta:.0f}s",
                flush=True,
            )
        if step in save_at:
            saved.append(save_checkpoint(engine, model, tokenizer_dir, config, step, step * per_step * config.context))
    if rank == 0:
        summary = {
            "checkpoints": saved,
            "steps": total_steps,
            "train_seconds": round(time.time() - started, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": loss.item(),
        }
        Path(layout.train_summary(config.lake)).write_text(json.dumps(summary, indent=2))


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, TrainConfig)


def final_checkpoint(lake: str, summary: dict) -> Path:
    """A local folder holding the last checkpoint of a training run (copied from S3 if it lives there)."""
    return storage.local_folder(layout.checkpoint(lake, summary["checkpoints"][-1]), load_config().cache_dir)


def main(args):
    from demo.model_eval import evaluate_checkpoint

    config = config_from_args(TrainConfig, args)
    summary = run(config)
    accuracy = evaluate_checkpoint(final_checkpoint(config.lake, summary), layout.world(config.lake, "queries.jsonl"))
    print(
        f"[train-model] {summary['parameters']:,} parameters, {summary['steps']} steps in "
        f"{summary['train_seconds']}s; checkpoints: {', '.join(summary['checkpoints'])}"
    )
    print(accuracy.table())


if __name__ == "__main__":  # a DeepSpeed rank
    train_rank(rank_arguments().plan)
    end_rank()
