"""Which weight matrices get a gradient block, and how each is laid out.

Every `nn.Linear` and GPT-2 `Conv1D` weight, the output head included. Conv1D stores its weight
as (in, out); blocks are always formed in the (out, in) orientation. When the output head shares
its weight with the input embedding (tied embeddings), the one parameter gets one block, and the
embedding's use of it is added to the head's contribution.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for the kernels
        return ()
    return (Conv1D,)


@dataclass
class WeightMatrix:
    name: str  # the parameter's name in model.named_parameters()
    module: nn.Module  # the Linear / Conv1D that multiplies by it
    out_features: int
    in_features: int
    stored_transposed: bool  # Conv1D: weight is (in, out)
    tied_embedding: nn.Embedding | None = None  # the embedding sharing this weight, if any
    output_head: bool = False  # its out side is the vocabulary (the LM head, tied or not)


def weight_matrices(model: nn.Module) -> list[WeightMatrix]:
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    embeddings = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Embedding)}
    conv1d = _conv1d_type()
    output_embeddings = getattr(model, "get_output_embeddings", None)  # transformers' models have it
    head = output_embeddings() if callable(output_embeddings) else None
    found = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            out_features, in_features, transposed = module.out_features, module.in_features, False
        elif conv1d and isinstance(module, conv1d):
            in_features, out_features = module.weight.shape
            transposed = True
        else:
            continue
        found.append(
            WeightMatrix(
                names[id(module.weight)],
                module,
                out_features,
                in_features,
                transposed,
                embeddings.get(id(module.weight)),
                module is head or id(module.weight) in embeddings,
            )
        )
    if not found:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv1D weight matrices")
    return found


def uniform_k(matrices: list[WeightMatrix], k: int) -> dict:
    """The same k for every matrix, in model order (the block order of the vectors)."""
    return {m.name: k for m in matrices}
