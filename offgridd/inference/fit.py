"""Will a model fit? Estimate its memory from the GGUF's own metadata, shorten the context or pick another model."""

from __future__ import annotations

from dataclasses import dataclass

from ..store import ModelManifest

MIN_CTX = 512
KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default f16 KV cache
# Measured here: a worker serving gemma3-270m (241 MiB file) at ctx 4096, after a request, holds 426 MiB resident;
# file + KV cache account for 313 MiB, the rest is the Python runtime, llama.cpp's compute buffers and the sampler.
# The estimate below comes to 423 MiB for that case.
OVERHEAD_BYTES = 110 << 20
RESERVE_BYTES = 64 << 20  # left for the daemon and the system when deciding what fits


class NoFit(Exception):
    """No model in the store fits in memory; the message says what to do."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadPlan:
    manifest: ModelManifest
    ctx: int
    needs_bytes: int
    note: str | None  # what was changed from the request, in words; None when nothing was


def kv_cache_bytes(m: ModelManifest, ctx: int) -> int:
    h = m.hyperparameters
    layers = h.get("block_count", 32)
    heads = h.get("attention.head_count", 32)
    kv_heads = h.get("attention.head_count_kv", heads)
    head_dim = h.get("embedding_length", 4096) // max(heads, 1)
    per_token = kv_heads * (h.get("attention.key_length", head_dim) + h.get("attention.value_length", head_dim))
    return layers * ctx * per_token * KV_BYTES_PER_ELEMENT


def estimate(m: ModelManifest, ctx: int, sequences: int = 1) -> int:
    """Bytes a worker needs for model `m` with `sequences` sequences of context `ctx` each."""
    return m.size + kv_cache_bytes(m, ctx * sequences) + OVERHEAD_BYTES


def _contexts(m: ModelManifest, wanted: int) -> list[int]:
    top = min(wanted, m.context_length)
    out = [top]
    while out[-1] // 2 >= MIN_CTX:
        out.append(out[-1] // 2)
    return out


def _best_ctx(m: ModelManifest, wanted: int, sequences: int, budget: int) -> int | None:
    return next((c for c in _contexts(m, wanted) if estimate(m, c, sequences) <= budget), None)


def _too_big(m: ModelManifest, max_model_bytes: int) -> bool:
    return bool(max_model_bytes) and m.size > max_model_bytes


def plan_load(requested: ModelManifest, store: list[ModelManifest], *, ctx: int, available: int,
              max_model_bytes: int, quantizations: list[str], bad: set[str], sequences: int = 1) -> LoadPlan:
    """The model and context to load for a request of `requested`, given free memory; raises NoFit."""
    budget = available - RESERVE_BYTES
    mb = 1 << 20
    why = None
    if requested.name in bad:
        why = f"{requested.name} is marked bad after repeated crashes"
    elif _too_big(requested, max_model_bytes):
        why = f"{requested.name} ({requested.size // mb} MB) is over this board's {max_model_bytes // mb} MB limit"
    elif (c := _best_ctx(requested, ctx, sequences, budget)) is not None:
        note = f"context shortened to {c} (of {min(ctx, requested.context_length)}) to fit memory" \
            if c < min(ctx, requested.context_length) else None
        return LoadPlan(manifest=requested, ctx=c, needs_bytes=estimate(requested, c, sequences), note=note)
    else:
        why = (f"{requested.name} needs {estimate(requested, MIN_CTX, sequences) // mb} MB at the smallest context, "
               f"{max(budget, 0) // mb} MB are available")

    def preference(m: ModelManifest) -> tuple:
        rank = quantizations.index(m.quantization) if m.quantization in quantizations else len(quantizations)
        return rank, -m.size, m.name

    for other in sorted(store, key=preference):
        if other.name == requested.name or other.name in bad or _too_big(other, max_model_bytes) \
                or other.kind != "llm":  # a speech model never stands in for a language model
            continue
        if (c := _best_ctx(other, ctx, sequences, budget)) is not None:
            return LoadPlan(manifest=other, ctx=c, needs_bytes=estimate(other, c, sequences),
                            note=f"{why}; serving {other.name} instead")
    raise NoFit(f"{why}, and no other model in the store fits; free memory, or import a smaller quantization "
                f"(this board prefers {', '.join(quantizations[:3])})")
