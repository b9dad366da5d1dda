"""Parameter and bucket layouts of Llama-style models, from a config (no weights needed).

Used by the simulated worlds (:mod:`benchmarks.simulated_world`) and the cost model
(:mod:`benchmarks.scale_model`): both need the exact sizes of the gradient buckets DDP
builds and of the parameter groups FSDP2 reduce-scatters, not the values.

* :data:`CONFIGS`: Llama 3.2 1B, Llama 3.1 8B and Llama 3.1 70B (sizes from their published
  ``config.json``), plus small configs for tests.
* :func:`param_shapes`: every parameter in ``named_parameters()`` order (HF ``LlamaForCausalLM``).
* :func:`ddp_buckets`: DDP's bucket assignment after its first-iteration rebuild: parameters
  in gradient-ready order (reverse definition order), a first bucket capped at
  ``dist._DEFAULT_FIRST_BUCKET_BYTES`` (1 MiB) and then ``bucket_cap_mb`` (25 MiB), a bucket
  closed as soon as it reaches its cap (the greedy rule of
  ``dist._compute_bucket_assignment_by_size``; a test checks the two agree).
* :func:`fsdp_groups`: one FSDP2 parameter group per decoder layer plus the root
  (embeddings, final norm, LM head), each parameter sharded on dim 0 with padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LlamaConfig", "CONFIGS", "param_shapes", "num_params", "ddp_buckets", "fsdp_groups",
           "Bucket", "FIRST_BUCKET_BYTES", "MIB", "mlp_shapes"]

MIB = 1024 * 1024
FIRST_BUCKET_BYTES = 1 * MIB  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Llama ``config.json`` that fix the parameter shapes."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


CONFIGS = {
    # meta-llama/Llama-3.2-1B config.json
    "1B": LlamaConfig("Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, tie_word_embeddings=True),
    # meta-llama/Llama-3.1-8B config.json
    "8B": LlamaConfig("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256),
    # meta-llama/Llama-3.1-70B config.json
    "70B": LlamaConfig("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256),
    # small layouts with the same structure, for the simulated-world tests
    "tiny": LlamaConfig("llama-tiny", 256, 688, 2, 4, 2, 1000),
    "small": LlamaConfig("llama-small", 1024, 2816, 2, 8, 4, 8000),
}


def param_shapes(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter, in ``LlamaForCausalLM.named_parameters()`` order."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (cfg.intermediate_size, h)),
            (p + "mlp.up_proj.weight", (cfg.intermediate_size, h)),
            (p + "mlp.down_proj.weight", (h, cfg.intermediate_size)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", (cfg.vocab_size, h)))
    return out


def num_params(cfg: LlamaConfig) -> int:
    return sum(math.prod(s) for _, s in param_shapes(cfg))


@dataclass(frozen=True)
class Bucket:
    """One DDP gradient bucket: its parameters (names, shapes) in bucket order."""

    index: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def param_numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.param_numels)


def ddp_buckets(cfg: LlamaConfig | list, *, bucket_cap_mb: float = 25.0, element_size: int = 4,
                first_bucket_bytes: int = FIRST_BUCKET_BYTES) -> list[Bucket]:
    """DDP's gradient buckets for ``cfg`` in the order the comm hook sees them (index 0 first).

    Args:
        cfg: a :class:`LlamaConfig`, or any ``[(name, shape), ...]`` in definition order.
        bucket_cap_mb: DDP's ``bucket_cap_mb`` (25 by default), in MiB as DDP counts it.
        element_size: bytes per gradient element (4 for fp32, 2 for bf16 / fp16).
        first_bucket_bytes: cap of the first bucket (DDP: 1 MiB when ``bucket_cap_mb`` is the default).
    """
    if bucket_cap_mb <= 0 or element_size <= 0:
        raise ValueError(f"bucket_cap_mb and element_size must be positive; got {bucket_cap_mb}, {element_size}")
    cap = int(bucket_cap_mb * MIB)
    limits = [min(first_bucket_bytes, cap), cap]
    params = list(reversed(param_shapes(cfg) if isinstance(cfg, LlamaConfig) else list(cfg)))  # gradient-ready order: the LM head's gradient comes first
    buckets: list[Bucket] = []
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    size = 0
    for name, shape in params:
        names.append(name)
        shapes.append(shape)
        size += math.prod(shape) * element_size
        limit = limits[min(len(buckets), len(limits) - 1)]
        if size >= limit:
            buckets.append(Bucket(len(buckets), tuple(names), tuple(shapes)))
            names, shapes, size = [], [], 0
    if names:
        buckets.append(Bucket(len(buckets), tuple(names), tuple(shapes)))
    return buckets


def fsdp_groups(cfg: LlamaConfig, world_size: int) -> list[dict]:
    """FSDP2 parameter groups (``fully_shard`` on every decoder layer, then the root), in the
    order their gradients are reduce-scattered in backward (last layer first, root last).

    Each group: ``name``, ``param_sizes`` (the per-rank padded shard length of every parameter:
    ``ceil(dim0 / P) * prod(rest)``, FSDP's ``padded_sharded_param_size``) and ``shard``
    (their sum: the reduce-scatter output length; the input is ``P * shard``).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")

    def padded(shape):
        return -(-shape[0] // world_size) * math.prod(shape[1:])

    shapes = param_shapes(cfg)
    layers: dict[int, list] = {}
    root = []
    for name, shape in shapes:
        if name.startswith("model.layers."):
            layers.setdefault(int(name.split(".")[2]), []).append(padded(shape))
        else:
            root.append(padded(shape))
    groups = [{"name": f"model.layers.{i}", "param_sizes": layers[i]} for i in sorted(layers, reverse=True)]
    groups.append({"name": "<root>", "param_sizes": root})
    for g in groups:
        g["shard"] = sum(g["param_sizes"])
    return groups


def mlp_shapes(width: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters of ``benchmarks/bench_ddp_step.py``'s MLP (``layers`` x ``Linear(width, width)``)."""
    out = []
    for i in range(layers):
        out += [(f"{2 * i}.weight", (width, width)), (f"{2 * i}.bias", (width,))]
    return out
