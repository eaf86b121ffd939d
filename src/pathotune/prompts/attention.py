"""One frozen timm block with prompt tokens beside the image tokens, not inside its sequence.

The image tokens (prefix + patches) run exactly the operations of timm's ``Block``/``Attention``; prompt tokens
only add keys and values. Two ways for image tokens to read them:

- ``gated`` (default): each prompt group gets its own softmax, and its output is added through a per-head gate
  ``tanh(g)`` that starts at 0, as in LLaMA-Adapter's zero-init attention. At g = 0 the image tokens are bit
  for bit the frozen model's, so a prompt method starts exactly at the linear probe, and a group whose gates are
  0 is switched off exactly. Prompt tokens that travel on to later blocks attend to the image tokens and to
  their own group.
- ``joint``: one softmax over image and prompt keys together, as VPT concatenates prompts into the sequence.

Image tokens never pay for a longer sequence: their attention over themselves is the same fused call as the
plain model's, and prompts add an N x P term. Prompt outputs are computed only for groups that a later block
reads (deep TVP is replaced at the next block, so it needs keys and values only), and a group that is the same
for every image of the batch (TVP, and TTP where it enters) has its keys and values computed once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn

from ..errors import ConfigError

PROMPT_ATTENTION = ("gated", "joint")


def check_block(block: nn.Module) -> None:
    """Prompts re-run a block's parts in timm's order; refuse block kinds whose forward differs."""

    if type(block).forward is not Block.forward or type(block.attn).forward is not Attention.forward:
        raise ConfigError(
            f"prompts need timm's standard ViT Block and Attention; this backbone uses "
            f"{type(block).__name__}/{type(block.attn).__name__}"
        )


def _heads(attn: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The qkv projection's output (B, N, 3 * width) -> q, k, v (B, H, N, hd), through timm's q/k norms."""
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    drop = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    w = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn.attn_drop(w) @ v


def _tokenwise(fn, prompts: list[torch.Tensor]) -> torch.Tensor:
    """``fn`` (token by token: norms, linears) over every group's tokens, concatenated: (B, P, ·).

    A group that is one set of tokens for the whole batch (a view expanded over it: TVP tokens, TTP tokens where
    they enter) goes through ``fn`` once instead of B times.
    """
    batch = max(p.shape[0] for p in prompts)
    shared = [p.shape[0] == 1 or p.stride(0) == 0 for p in prompts]
    if not any(shared):
        return fn(torch.cat(prompts, dim=1))

    def run(rows: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(fn(torch.cat(rows, dim=1)).split([r.shape[1] for r in rows], dim=1)) if rows else []

    once = iter(run([p[:1] for p, s in zip(prompts, shared, strict=True) if s]))
    each = iter(run([p for p, s in zip(prompts, shared, strict=True) if not s]))
    return torch.cat([next(once).expand(batch, -1, -1) if s else next(each) for s in shared], dim=1)


def _project(attn: nn.Module, o: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """Heads -> width, then timm's output norm, gate (which reads the block's normed input ``x``) and projection."""
    b, _, n, _ = o.shape
    o = attn.norm(o.transpose(1, 2).reshape(b, n, attn.attn_dim))
    if attn.gate is not None:
        o = o * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(o))


def _residual(block: nn.Module, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    h = h + block.drop_path1(block.ls1(attn_out))
    return h + block.drop_path2(block.ls2(block.mlp(block.norm2(h))))


def _slices(sizes: list[int]) -> list[slice]:
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [slice(e - n, e) for n, e in zip(sizes, ends, strict=True)]


def _own_group_mask(groups: list[slice], kept: list[int], like: torch.Tensor) -> torch.Tensor:
    """(Pc, P) additive mask: 0 where a kept group's row meets its own group's column, -inf elsewhere."""
    sizes = [groups[i].stop - groups[i].start for i in kept]
    mask = torch.full((sum(sizes), groups[-1].stop), float("-inf"), dtype=like.dtype, device=like.device)
    start = 0
    for i, n in zip(kept, sizes, strict=True):
        mask[start : start + n, groups[i]] = 0.0
        start += n
    return mask


def _key_gates(gates: list[torch.Tensor], sizes: list[int], batch: int) -> torch.Tensor:
    """(B, H, P, 1): each prompt key's gate, from one (H,) or (B, H) gate per group."""
    return torch.cat(
        [g.view(-1, g.shape[-1], 1, 1).expand(batch, -1, n, 1) for g, n in zip(gates, sizes, strict=True)], dim=2
    )


def _add_gated_prompt_term(attn, o, q, pk, pv, groups) -> None:
    """Add to ``o`` (B, H, N, hd), head by head, each group's softmax over its keys applied to its gated values.

    Head by head on the strided q view: a batched matmul over (B, H) would first copy q, and on a CPU the copy
    costs more than the arithmetic on a handful of keys. Scores are laid out (B, P, N) because a softmax over a
    few keys is far faster along dim -2 than along the last dim. (``baddbmm_`` would save a buffer per head but
    refuses autocast's lower-precision product on a float32 ``o``.)
    """
    pk = pk * attn.scale
    for head in range(q.shape[1]):
        scores = torch.bmm(pk[:, head], q[:, head].transpose(1, 2))  # (B, P, N)
        weights = torch.cat([scores[:, sl].softmax(-2) for sl in groups], dim=1)
        o[:, head] += torch.bmm(attn.attn_drop(weights).transpose(1, 2), pv[:, head])  # autocast-safe add


def _carried_attention(attn, pq, k, v, pk, pv, rows, mask) -> torch.Tensor:
    """Attention of the carried prompt queries ``pq[:, :, rows]`` over image keys and (masked) prompt keys."""
    out = []
    n_img = k.shape[2]
    for head in range(pq.shape[1]):
        cq = pq[:, head, rows] * attn.scale  # (B, Pc, hd)
        scores = torch.cat(
            [torch.bmm(cq, k[:, head].transpose(1, 2)), torch.bmm(cq, pk[:, head].transpose(1, 2)) + mask], dim=-1
        )
        w = attn.attn_drop(scores.softmax(-1))
        out.append(torch.bmm(w[..., :n_img], v[:, head]) + torch.bmm(w[..., n_img:], pv[:, head]))
    return torch.stack(out, dim=1)  # (B, H, Pc, hd)


def prompted_block(
    block: nn.Module,
    h: torch.Tensor,
    prompts: list[torch.Tensor],
    gates: list[torch.Tensor] | None,
    keep: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Run ``block`` on image tokens ``h`` (B, N, D) with prompt groups ``prompts`` [(B, P_g, D)].

    ``gates``: one (H,) or (B, H) tensor of gate values per group (already through tanh), or None for the
    joint softmax. ``keep[g]``: whether group g's output tokens are needed after this block. Returns the new
    image tokens and, per group, its output tokens (None where not kept).

    Attention over the few prompt keys is written out (two small matmuls): the fused kernel is built for long
    key sequences and costs far more than the arithmetic on a handful of keys. Gates scale the values, so a
    closed gate adds an exact zero.
    """
    attn = block.attn
    x = block.norm1(h)
    q, k, v = _heads(attn, attn.qkv(x))
    sizes = [p.shape[1] for p in prompts]
    groups = _slices(sizes)
    pq, pk, pv = _heads(attn, _tokenwise(lambda t: attn.qkv(block.norm1(t)), prompts))
    if gates is None:
        o = _attend(attn, q, torch.cat([k, pk], dim=2), torch.cat([v, pv], dim=2))
    else:
        o = _attend(attn, q, k, v)
        # Add into the fused kernel's output in place when nothing needs it for a backward pass (one buffer less).
        o = o if not torch.is_grad_enabled() else o.clone()
        _add_gated_prompt_term(attn, o, q, pk, pv * _key_gates(gates, sizes, h.shape[0]), groups)
    h_out = _residual(block, h, _project(attn, o, x))

    outs: list[torch.Tensor | None] = [None] * len(prompts)
    kept = [i for i, k_ in enumerate(keep) if k_]
    if not kept:
        return h_out, outs
    first, last = groups[kept[0]].start, groups[kept[-1]].stop
    contiguous = sum(groups[i].stop - groups[i].start for i in kept) == last - first
    rows = (
        slice(first, last) if contiguous else torch.cat([torch.arange(groups[i].start, groups[i].stop) for i in kept])
    )
    # Gated: a group's tokens see the image and their own group only, so shutting one group never moves another.
    mask = _own_group_mask(groups, kept, pk) if gates is not None else torch.zeros((), dtype=pk.dtype)
    co = _carried_attention(attn, pq, k, v, pk, pv, rows, mask)
    cp = torch.cat([prompts[i] for i in kept], dim=1)
    px = _tokenwise(block.norm1, [prompts[i] for i in kept]) if attn.gate is not None else None
    out = _residual(block, cp, _project(attn, co, px))
    for i, chunk in zip(kept, out.split([groups[i].stop - groups[i].start for i in kept], dim=1), strict=True):
        outs[i] = chunk
    return h_out, outs
