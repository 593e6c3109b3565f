"""Reading a checkpoint folder: its manifest and its optimizer second moments.

A checkpoint is a Hugging Face causal LM folder (GPT-2, Llama and other shapes; `config.json`,
safetensors or `.bin` weights, its own tokenizer). Second moments come from, in this order:

- `optimizer.pt` in this project's consolidated layout (`train_model` writes it), or in torch's own
  `optimizer.state_dict()` layout (what a plain torch loop or the Hugging Face Trainer saves):
  parameters are numbered there, not named. The numbers are mapped to names by the groups'
  `param_names` when the optimizer was built from `named_parameters()` (torch >= 2.5 saves them),
  otherwise by assuming the optimizer was built from `model.parameters()`, i.e. numbers follow
  `model.named_parameters()` order across the groups in turn; counts and every shape are checked
  against the model, so a different order is refused rather than silently misread;
- the DeepSpeed ZeRO checkpoint's sharded states (`zero/<tag>/zero_pp_rank_*_optim_states.pt`);
- nothing: the folder is indexed without the optimizer correction (normaliser "none").

All give the same dict:

    {"kind": "adam"|"adafactor", "step": int, "lr": float, "betas": [b1, b2], "eps": float,
     "state": {param_name: {"exp_avg_sq": tensor} | {"row_var": tensor, "col_var": tensor}}}

A folder without `manifest.json` (trained elsewhere) gets one derived on the fly: its
checkpoint_id is the folder name plus a hash of its config and weights, its step and learning rate
come from the optimizer state or `trainer_state.json` when present.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint folder lacks something the pipeline needs."""


class CheckpointMismatch(ValueError):
    """A checkpoint id already indexed with other weights, or tokens another tokenizer cut: vectors
    of it would be silently wrong."""


def load_manifest(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / "manifest.json"
    if not path.exists():
        return derive_manifest(checkpoint_dir)
    return json.loads(path.read_text())


def check_complete(checkpoint_dir: Path, optimizer_source: str | None) -> None:
    """CheckpointError unless the folder holds every file extraction reads (config, weights, and the
    optimizer state when `optimizer_source` is not None), each non-empty. Nothing is loaded: cheap
    enough to run before a checkpoint is registered, however big it is. A manifest is not needed:
    one is derived for folders trained elsewhere (`derive_manifest`)."""
    checkpoint_dir = Path(checkpoint_dir)
    needed = [checkpoint_dir / "config.json", *weights_files(checkpoint_dir)]
    if optimizer_source is not None:
        consolidated = checkpoint_dir / "optimizer.pt"
        if optimizer_source == "consolidated" or (optimizer_source == "auto" and consolidated.exists()):
            needed.append(consolidated)
        else:
            latest = checkpoint_dir / "zero" / "latest"
            needed.append(latest)
            if latest.is_file():
                tag_dir = checkpoint_dir / "zero" / latest.read_text().strip()
                needed += [
                    tag_dir / "mp_rank_00_model_states.pt",
                    *(
                        sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
                        or [tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
                    ),
                ]
    missing = [
        str(path.relative_to(checkpoint_dir)) for path in needed if not path.is_file() or not path.stat().st_size
    ]
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: incomplete checkpoint, missing or empty: {', '.join(missing)}")


def tokenizer_id(tokenizer_json: bytes) -> str:
    """Names a tokenizer by its tokenizer.json; the tokens table's `tokenizer_fingerprint` starts with it."""
    return hashlib.sha256(tokenizer_json).hexdigest()[:16]


def weights_files(checkpoint_dir: Path) -> list[Path]:
    checkpoint_dir = Path(checkpoint_dir)
    for pattern in ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model.bin", "pytorch_model-*-of-*.bin"):
        found = sorted(checkpoint_dir.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{checkpoint_dir}: no model weights (model*.safetensors or pytorch_model*.bin)")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(checkpoint_dir: Path) -> str:
    """Hash of the weights: of the one weights file, or of the shards' own hashes in name order."""
    hashes = [sha256_file(path) for path in weights_files(checkpoint_dir)]
    return (hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest())[:16]


def derive_manifest(checkpoint_dir: Path) -> dict:
    """A manifest for a folder trained elsewhere, from what the folder itself holds."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").exists():
        raise CheckpointError(f"{checkpoint_dir}: not a Hugging Face model folder (no config.json)")
    content = hashlib.sha256(
        (checkpoint_dir / "config.json").read_bytes() + weights_fingerprint(checkpoint_dir).encode()
    )
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", checkpoint_dir.resolve().name).strip("-") or "checkpoint"
    trainer = checkpoint_dir / "trainer_state.json"
    trainer_state = json.loads(trainer.read_text()) if trainer.exists() else {}
    source = optimizer_state_source(checkpoint_dir)
    state = load_second_moments(checkpoint_dir) if source else {}
    logged_lr = [entry["learning_rate"] for entry in trainer_state.get("log_history", []) if "learning_rate" in entry]
    return {
        "checkpoint_id": f"{name}-{content.hexdigest()[:12]}",
        "step": int(trainer_state.get("global_step", state.get("step", 0))),
        "lr": state.get("lr", logged_lr[-1] if logged_lr else None),
        "optimizer": state.get("kind", "none"),
        "optimizer_state": source or "none",
        "derived_from": str(checkpoint_dir.resolve()),
    }


def optimizer_state_source(checkpoint_dir: Path, source: str = "auto") -> str | None:
    """Where the folder's optimizer state is: "consolidated" (optimizer.pt), "zero", or None."""
    checkpoint_dir = Path(checkpoint_dir)
    if source not in ("auto", "consolidated", "zero"):
        raise ValueError(f"unknown optimizer-state source {source!r}")
    if source in ("auto", "consolidated") and (checkpoint_dir / "optimizer.pt").exists():
        return "consolidated"
    if source in ("auto", "zero") and (checkpoint_dir / "zero" / "latest").exists():
        return "zero"
    return None


def load_second_moments(checkpoint_dir: Path, source: str = "auto") -> dict:
    """The optimizer's second moments per parameter; `source` is "consolidated", "zero" or "auto"."""
    import torch

    checkpoint_dir = Path(checkpoint_dir)
    found = optimizer_state_source(checkpoint_dir, source)
    if found == "consolidated":
        saved = torch.load(checkpoint_dir / "optimizer.pt", map_location="cpu")
        return second_moments_from_torch(checkpoint_dir, saved) if "param_groups" in saved else saved
    if found == "zero":
        return second_moments_from_zero(checkpoint_dir)
    raise CheckpointError(
        f"{checkpoint_dir}: missing optimizer state ("
        f"{'optimizer.pt' if source == 'consolidated' else 'neither optimizer.pt nor zero/latest'})"
    )


def parameter_shapes(checkpoint_dir: Path) -> dict:
    """name -> shape of every parameter, in `named_parameters()` order (model built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint_dir))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def second_moments_from_torch(checkpoint_dir: Path, saved: dict) -> dict:
    """torch's `optimizer.state_dict()` (numbered parameters) -> the named layout above."""
    shapes = parameter_shapes(checkpoint_dir)
    groups = saved["param_groups"]
    numbers = [i for group in groups for i in group["params"]]
    if all("param_names" in group for group in groups):
        names = [n for group in groups for n in group["param_names"]]
    elif len(numbers) == len(shapes):
        names = list(shapes)  # the assumption: optimizer built from model.parameters()
    else:
        raise CheckpointError(
            f"{checkpoint_dir}/optimizer.pt: {len(numbers)} parameters in the optimizer, "
            f"{len(shapes)} in the model, and no param_names to match them by"
        )
    state, kind = {}, None
    for number, name in zip(numbers, names):
        held = saved["state"].get(number, {})
        keys = [k for k in ("exp_avg_sq", "row_var", "col_var", "variance") if k in held]
        if not keys:
            raise CheckpointError(f"{checkpoint_dir}/optimizer.pt: no second moment for parameter {number} ({name})")
        kind = "adam" if "exp_avg_sq" in held else "adafactor"
        if name not in shapes:
            raise CheckpointError(f"{checkpoint_dir}/optimizer.pt: parameter {name!r} is not in the model")
        if "exp_avg_sq" in held and tuple(held["exp_avg_sq"].shape) != shapes[name]:
            raise CheckpointError(
                f"{checkpoint_dir}/optimizer.pt: state {number} has shape {tuple(held['exp_avg_sq'].shape)}, parameter "
                f"{name!r} {shapes[name]}: the optimizer was not built from model.parameters() in order; build it "
                f"from model.named_parameters() (torch >= 2.5 then saves param_names) and save it again"
            )
        state[name] = {k: held[k].float() for k in keys}
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise CheckpointError(f"{checkpoint_dir}/optimizer.pt: no state for parameter(s) {missing[:3]}")
    group0, first = groups[0], saved["state"][numbers[0]]
    return {
        "kind": kind,
        "step": int(first["step"]),
        "lr": float(group0["lr"]),
        "betas": list(group0.get("betas", ())),
        "eps": group0["eps"],
        "state": state,
    }


def second_moments_from_zero(checkpoint_dir: Path) -> dict:
    """Reassemble Adam's exp_avg_sq per parameter from ZeRO stage 1/2 shards.

    Each rank holds one contiguous slice of every parameter group's flat fp32 buffer; parameters
    lie in that buffer in `param_shapes` order, so the whole buffer is the ranks' slices joined.
    """
    import torch

    zero_dir = Path(checkpoint_dir) / "zero"
    latest = zero_dir / "latest"
    if not latest.exists():
        raise CheckpointError(f"{checkpoint_dir}: missing optimizer state (neither optimizer.pt nor zero/latest)")
    tag_dir = zero_dir / latest.read_text().strip()
    shards = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=lambda p: int(p.name.split("_")[3]))
    if not shards:
        raise CheckpointError(f"{tag_dir}: no zero_pp_rank_*_optim_states.pt shards")
    model_states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    ranks = [torch.load(s, map_location="cpu", weights_only=False)["optimizer_state_dict"] for s in shards]
    if ranks[0]["zero_stage"] not in (1, 2):
        raise CheckpointError(f"{tag_dir}: ZeRO stage {ranks[0]['zero_stage']} shards are not supported here")
    if len(ranks) != ranks[0]["partition_count"][0]:
        raise CheckpointError(f"{tag_dir}: {len(ranks)} shards for a partition count of {ranks[0]['partition_count']}")

    state = {}
    for group, shapes in enumerate(model_states["param_shapes"]):
        flat = torch.cat([r["base_optimizer_state"]["state"][group]["exp_avg_sq"] for r in ranks])
        offset = 0
        for name, shape in shapes.items():
            numel = shape.numel()
            state[name] = {"exp_avg_sq": flat[offset : offset + numel].view(shape).clone()}
            offset += numel
    base = ranks[0]["base_optimizer_state"]
    group0 = base["param_groups"][0]
    return {
        "kind": "adam",
        "step": int(base["state"][0]["step"]),
        "lr": group0["lr"],
        "betas": list(group0["betas"]),
        "eps": group0["eps"],
        "state": state,
    }
