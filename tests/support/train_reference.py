"""A torch + peft reference for ``ferrotune.finetune``'s training loop (the parity oracle).

It implements the semantics of the training API notes literally, with nothing of ferrotune's
but the tokenized rows it reads (``ferrotune.load_tokenized``):

- rows in file order (``shuffle=False``); a micro-batch is ``per_device_train_batch_size``
  consecutive rows (the epoch's last partial micro-batch kept); an optimizer step sums the
  gradient of ``gradient_accumulation_steps`` consecutive micro-batches (the epoch's last partial
  group is a step of its own, so an epoch has ``ceil(n_micro_batches / ga)`` steps and
  ``total_steps = max_steps if max_steps > 0 else ceil(num_train_epochs * that)``; later epochs
  start again from the first row);
- every segment (conversation) of a packed row runs through the model *unpacked*, as a sequence
  of its own with positions from 0 (a step's segments go through together as the rows of a
  right-padded batch, the padding masked out): the ground truth that packing with a
  block-diagonal causal mask must reproduce. Position ``t`` predicts ``labels[t + 1]`` of the
  same segment; ``-100`` is not a target; the vocabulary projection runs only where there is a
  target (``logits_to_keep``), which changes no number;
- step loss = (sum of token cross-entropy over the step's micro-batches) / (target tokens of the
  step); the gradient is that of the same quantity (each segment's CE sum divided by the step's
  target count, accumulated by ``backward``), in float32;
- ``torch.nn.utils.clip_grad_norm_(lora_params, max_grad_norm)`` (skipped when ``<= 0``),
  ``torch.optim.AdamW(lr, betas, eps, weight_decay)`` over every LoRA tensor,
  ``transformers.get_scheduler(type, opt, num_warmup_steps, num_training_steps=total_steps)``
  stepped after each ``optimizer.step()`` (so step 0 uses ``lambda(0)``).

The model is a ``peft`` model whose only trainable parameters are the LoRA tensors (see
``tests/support/tiny_phi3.py``: ``load_reference`` + ``peft_model``, or
``peft.PeftModel.from_pretrained``). ``lora_dropout`` must be 0 for a comparison to make sense.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE",
    "Segment",
    "ReferenceRun",
    "rows_from",
    "row_segments",
    "steps_per_epoch",
    "total_steps",
    "warmup_steps_for",
    "step_plan",
    "segment_ce",
    "segments_ce",
    "evaluate",
    "train",
    "lora_state",
]

IGNORE = -100

#: (input_ids, labels) of one conversation, int64 numpy arrays
Segment = tuple


@dataclass
class ReferenceRun:
    """What :func:`train` did, one entry per optimizer step."""

    #: (sum of CE) / (target tokens) of each step, as float (float64 sum of float32 CE sums)
    step_losses: list = field(default_factory=list)
    #: target tokens of each step
    step_targets: list = field(default_factory=list)
    #: total gradient norm before clipping (what clip_grad_norm_ returns)
    grad_norms: list = field(default_factory=list)
    #: steps whose gradient clipping scaled the gradient down (norm > max_grad_norm)
    clipped_steps: list = field(default_factory=list)
    #: the learning rate each step used (scheduler lambda(step) * lr)
    learning_rates: list = field(default_factory=list)
    #: the learning rate after the scheduler stepped (what HF's Trainer logs for a step)
    next_learning_rates: list = field(default_factory=list)
    #: epoch index of each step
    epochs: list = field(default_factory=list)
    #: row indices of each step's micro-batches
    plan: list = field(default_factory=list)
    #: the final LoRA tensors (PEFT names, float32), filled when ``train(..., return_lora=True)``
    lora: Optional[dict] = None


# ---------------------------------------------------------------------------------------
# Rows and the step plan
# ---------------------------------------------------------------------------------------


def row_segments(row: dict) -> list:
    """The segments of one tokenized row (``TokenizedDataset[i]``) as (ids, labels) int64 arrays."""
    ids = np.asarray(row["input_ids"], dtype=np.int64)
    labels = np.asarray(row["labels"], dtype=np.int64)
    lengths = [int(n) for n in row["seq_lengths"]]
    assert sum(lengths) == len(ids) == len(labels), (lengths, len(ids), len(labels))
    out, pos = [], 0
    for n in lengths:
        out.append((ids[pos : pos + n], labels[pos : pos + n]))
        pos += n
    return out


def rows_from(data: Any) -> list:
    """Rows as lists of segments, from a tokenized file path, a ``TokenizedDataset``, or an
    iterable of row dicts (``input_ids``, ``labels``, ``seq_lengths``)."""
    if isinstance(data, (str, os.PathLike)):
        import ferrotune

        data = ferrotune.load_tokenized(data)
    return [row_segments(r) for r in data]


def n_targets(segment) -> int:
    _, labels = segment
    return int((labels[1:] != IGNORE).sum())


def steps_per_epoch(n_rows: int, batch_size: int, ga: int) -> int:
    return math.ceil(math.ceil(n_rows / batch_size) / ga)


def total_steps(n_rows: int, batch_size: int, ga: int, *, max_steps: int = -1, num_train_epochs: float = 1.0) -> int:
    if max_steps > 0:
        return max_steps
    return math.ceil(num_train_epochs * steps_per_epoch(n_rows, batch_size, ga))


def warmup_steps_for(total: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """``warmup_steps``, or ``ceil(warmup_ratio * total)`` when it is 0 (as the API notes say)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total)


def step_plan(n_rows: int, batch_size: int, ga: int, total: int) -> list:
    """``total`` steps, each ``(epoch, [micro-batch row-index lists])``, file order every epoch."""
    micro = [list(range(i, min(i + batch_size, n_rows))) for i in range(0, n_rows, batch_size)]
    groups = [micro[i : i + ga] for i in range(0, len(micro), ga)]
    assert groups, "no rows"
    plan, epoch = [], 0
    while len(plan) < total:
        for g in groups:
            if len(plan) == total:
                break
            plan.append((epoch, g))
        epoch += 1
    return plan


# ---------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the duration (``None``: left alone).

    The reference runs with 1 thread by default: its matrices are tiny (hidden 64), and with
    2+ threads on a busy 2-CPU machine torch's OpenMP workers wait on each other for
    milliseconds per op (a 20-step run took 13-15 s with 2 threads and 3 s with 1 there)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def segment_ce(model, segment) -> tuple:
    """(sum of target-token cross-entropy as a float32 0-d tensor with grad, number of targets)
    of one conversation run as a sequence of its own (positions 0..n-1, causal)."""
    ids, labels = segment
    t = n_targets(segment)
    if t == 0:
        return None, 0
    input_ids = torch.from_numpy(np.ascontiguousarray(ids)).long().unsqueeze(0)
    position_ids = torch.arange(input_ids.shape[1], dtype=torch.long).unsqueeze(0)
    # positions t whose next label is a target; the (vocab-wide) lm_head runs only there
    # (transformers' logits_to_keep: the same logits, without the unused rows)
    where = torch.from_numpy(np.flatnonzero(labels[1:] != IGNORE)).long()
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=where)
    logits = out.logits[0].float()  # (t, vocab)
    target = torch.from_numpy(labels[1:][where.numpy()]).long()
    ce = F.cross_entropy(logits, target, reduction="sum")
    return ce, t


def segments_ce(model, segments) -> tuple:
    """:func:`segment_ce` of several conversations in one forward pass: each is still a
    sequence of its own (a row of a right-padded batch, positions 0..n-1, the padding masked
    out), only the Python / dispatch overhead is shared. Returns (CE sum over all, targets)."""
    segs = [s for s in segments if n_targets(s) > 0]
    if not segs:
        return None, 0
    if len(segs) == 1:
        return segment_ce(model, segs[0])
    width = max(len(ids) for ids, _ in segs)
    input_ids = torch.zeros((len(segs), width), dtype=torch.long)
    attention = torch.zeros((len(segs), width), dtype=torch.long)
    keep = torch.zeros((len(segs), width), dtype=torch.bool)
    targets = []
    for i, (ids, labels) in enumerate(segs):
        n = len(ids)
        input_ids[i, :n] = torch.from_numpy(np.ascontiguousarray(ids)).long()
        attention[i, :n] = 1
        where = np.flatnonzero(labels[1:] != IGNORE)
        keep[i, torch.from_numpy(where).long()] = True
        targets.append(labels[1:][where])
    position_ids = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(len(segs), width)
    out = model(
        input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False, logits_to_keep=keep
    )
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float()  # (targets, vocab), row-major order
    target = torch.from_numpy(np.concatenate(targets)).long()
    assert logits.shape[0] == target.shape[0], (logits.shape, target.shape)
    return F.cross_entropy(logits, target, reduction="sum"), int(target.shape[0])


@torch.no_grad()
def evaluate(model, data: Any, batch: int = 16, threads: Optional[int] = 1) -> tuple:
    """(mean CE over every target token of every row, number of targets): sum / count, over
    all rows together (token-weighted)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    segs = [seg for row in rows_from(data) for seg in row]
    with torch_threads(threads):
        for i in range(0, len(segs), batch):
            ce, t = segments_ce(model, segs[i : i + batch])
            if t:
                total += float(ce)
                count += t
    model.train(was_training)
    return (total / count if count else float("nan")), count


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def lora_state(model) -> dict:
    """The LoRA tensors under their PEFT (saved-adapter) names, float32 numpy copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to(torch.float32).cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def _lora_params(model) -> list:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params, "the model has no trainable parameters"
    bad = [n for n, _ in params if "lora_" not in n]
    assert not bad, f"trainable parameters that are not LoRA tensors: {bad[:5]}"
    return [p for _, p in params]


def train(
    model,
    data: Any,
    *,
    per_device_train_batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 2e-5,
    lr_scheduler_type: str = "linear",
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    weight_decay: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_epsilon: float = 1e-8,
    max_grad_norm: float = 1.0,
    max_steps: int = -1,
    num_train_epochs: float = 1.0,
    return_lora: bool = True,
    callback: Optional[Callable[[int, Any, "ReferenceRun"], None]] = None,
    threads: Optional[int] = 1,
) -> ReferenceRun:
    """Trains ``model``'s LoRA tensors in place on ``data`` (see the module docstring).

    ``callback(step, model, run)`` runs after every optimizer step (``step`` counted from 1,
    ``run`` filled up to that step), e.g. to evaluate where ferrotune evaluates or to snapshot
    the adapter where it saves a checkpoint. ``threads``: see :func:`torch_threads`."""
    with torch_threads(threads):
        return _train(
            model,
            rows_from(data),
            int(per_device_train_batch_size),
            int(gradient_accumulation_steps),
            learning_rate=learning_rate,
            lr_scheduler_type=lr_scheduler_type,
            warmup_steps=warmup_steps,
            warmup_ratio=warmup_ratio,
            weight_decay=weight_decay,
            betas=(adam_beta1, adam_beta2),
            eps=adam_epsilon,
            max_grad_norm=max_grad_norm,
            max_steps=max_steps,
            num_train_epochs=num_train_epochs,
            return_lora=return_lora,
            callback=callback,
        )


def _train(
    model,
    rows: list,
    bs: int,
    ga: int,
    *,
    learning_rate,
    lr_scheduler_type,
    warmup_steps,
    warmup_ratio,
    weight_decay,
    betas,
    eps,
    max_grad_norm,
    max_steps,
    num_train_epochs,
    return_lora,
    callback,
) -> ReferenceRun:
    from transformers import get_scheduler

    total = total_steps(len(rows), bs, ga, max_steps=max_steps, num_train_epochs=num_train_epochs)
    warm = warmup_steps_for(total, warmup_steps, warmup_ratio)
    params = _lora_params(model)
    opt = torch.optim.AdamW(params, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)
    sched = get_scheduler(lr_scheduler_type, opt, num_warmup_steps=warm, num_training_steps=total)
    run = ReferenceRun()
    model.train()  # (dropout is 0: train and eval mode compute the same)
    for step, (epoch, micro_batches) in enumerate(step_plan(len(rows), bs, ga, total)):
        segs = [seg for mb in micro_batches for r in mb for seg in rows[r]]
        step_t = sum(n_targets(s) for s in segs)
        assert step_t > 0, f"step {step} has no target tokens"
        opt.zero_grad(set_to_none=True)
        ce, t = segments_ce(model, segs)  # (the step's segments in one padded batch)
        assert t == step_t, (t, step_t)
        (ce / step_t).backward()
        loss = float(ce.detach()) / step_t
        if not math.isfinite(loss):
            raise FloatingPointError(f"reference loss is {loss} at step {step + 1}")
        for p in params:  # a LoRA tensor no segment reached still takes part (weight decay)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if max_grad_norm is not None and max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            if norm > max_grad_norm:
                run.clipped_steps.append(step + 1)
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        run.learning_rates.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
        run.next_learning_rates.append(float(opt.param_groups[0]["lr"]))
        run.step_losses.append(loss)
        run.step_targets.append(step_t)
        run.grad_norms.append(norm)
        run.epochs.append(epoch)
        run.plan.append(micro_batches)
        if callback is not None:
            callback(step + 1, model, run)
    if return_lora:
        run.lora = lora_state(model)
    return run


def load_adapter(base_dir: Union[str, os.PathLike], adapter_dir: Union[str, os.PathLike], *, trainable: bool = True):
    """The float32 eager reference model of ``base_dir`` (``tiny_phi3.load_reference``) with a
    saved PEFT adapter on top."""
    from peft import PeftModel

    from tests.support.tiny_phi3 import load_reference

    base = load_reference(base_dir)
    return PeftModel.from_pretrained(base, os.fspath(adapter_dir), is_trainable=trainable)


def compare_tensors(got: dict, want: dict, rtol: float) -> list:
    """Names whose ``max|got - want| > rtol * max(max|want|, tiny)`` (plus missing / extra names)."""
    bad = []
    for k in sorted(set(got) | set(want)):
        if k not in got or k not in want:
            bad.append(f"{k}: {'missing' if k not in got else 'unexpected'}")
            continue
        a, b = np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)
        if a.shape != b.shape:
            bad.append(f"{k}: shape {a.shape} != {b.shape}")
            continue
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-12)
        if err > rtol * scale:
            bad.append(f"{k}: max abs diff {err:.3g} vs scale {scale:.3g}")
    return bad
