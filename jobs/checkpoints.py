"""Reading a checkpoint folder: its manifest and its optimizer second moments.

Second moments come from the consolidated `optimizer.pt` or straight from the DeepSpeed ZeRO
checkpoint's sharded optimizer states (`zero/<tag>/zero_pp_rank_*_optim_states.pt`), so a checkpoint
saved by a plain DeepSpeed job, without our consolidation step, can be indexed too. Both give the
same dict:

    {"kind": "adam"|"adafactor", "step": int, "lr": float, "betas": [b1, b2], "eps": float,
     "state": {param_name: {"exp_avg_sq": tensor} | {"row_var": tensor, "col_var": tensor}}}
"""

from __future__ import annotations

import json
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint folder lacks something the pipeline needs."""


def checkpoints_root(lake_root) -> Path:
    """Where trained checkpoint folders live: <lake>/model/checkpoints, outside every Delta table's
    folder (inside the `checkpoints` table's, a vacuum of the table deleted them)."""
    return Path(lake_root) / "model" / "checkpoints"


def checkpoint_path(lake_root, checkpoint_id: str) -> Path:
    """A trained checkpoint's folder; lakes written before the move keep it in <lake>/checkpoints/."""
    path = checkpoints_root(lake_root) / checkpoint_id
    legacy = Path(lake_root) / "checkpoints" / checkpoint_id
    return legacy if not path.exists() and legacy.exists() else path


def load_manifest(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / "manifest.json"
    if not path.exists():
        raise CheckpointError(f"{checkpoint_dir}: no manifest.json (checkpoint_id, step, lr, optimizer)")
    return json.loads(path.read_text())


def check_complete(checkpoint_dir: Path, optimizer_source: str | None) -> None:
    """CheckpointError unless the folder holds every file extraction reads (config, weights, and the
    optimizer state when `optimizer_source` is not None), each non-empty. Nothing is loaded: cheap
    enough to run before a checkpoint is registered, however big it is."""
    checkpoint_dir = Path(checkpoint_dir)
    needed = [checkpoint_dir / name for name in ("manifest.json", "config.json", "model.safetensors")]
    if optimizer_source is not None:
        consolidated = checkpoint_dir / "optimizer.pt"
        if optimizer_source == "consolidated" or (optimizer_source == "auto" and consolidated.exists()):
            needed.append(consolidated)
        else:
            latest = checkpoint_dir / "zero" / "latest"
            needed.append(latest)
            if latest.is_file():
                tag_dir = checkpoint_dir / "zero" / latest.read_text().strip()
                needed += [tag_dir / "mp_rank_00_model_states.pt",
                           *(sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")) or
                             [tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"])]
    missing = [str(path.relative_to(checkpoint_dir)) for path in needed if not path.is_file() or not path.stat().st_size]
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: incomplete checkpoint, missing or empty: {', '.join(missing)}")


def load_second_moments(checkpoint_dir: Path, source: str = "auto") -> dict:
    """The optimizer's second moments per parameter; `source` is "consolidated", "zero" or "auto"."""
    import torch

    checkpoint_dir = Path(checkpoint_dir)
    consolidated = checkpoint_dir / "optimizer.pt"
    if source == "consolidated" or (source == "auto" and consolidated.exists()):
        if not consolidated.exists():
            raise CheckpointError(f"{checkpoint_dir}: missing optimizer state optimizer.pt")
        return torch.load(consolidated, map_location="cpu")
    if source in ("zero", "auto"):
        return second_moments_from_zero(checkpoint_dir)
    raise ValueError(f"unknown optimizer-state source {source!r}")


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
    shards = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                    key=lambda p: int(p.name.split("_")[3]))
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
            state[name] = {"exp_avg_sq": flat[offset:offset + numel].view(shape).clone()}
            offset += numel
    base = ranks[0]["base_optimizer_state"]
    group0 = base["param_groups"][0]
    return {"kind": "adam", "step": int(base["state"][0]["step"]), "lr": group0["lr"],
            "betas": list(group0["betas"]), "eps": group0["eps"], "state": state}
