"""Compute each merged tensor from memory-mapped inputs, in float32, one base file open at a time."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm.auto import tqdm

from yak import YakError
from yak.formats import WeightHandle, open_weights
from yak.merge.plan import Plan, Step

logger = logging.getLogger(__package__)  # "yak.merge", the name the --verbose lines have always shown


class _Inputs:
    """The open adapter files (kept open: they are small next to the base) and one open base file."""

    def __init__(self, plan: Plan, stack: ExitStack):
        self.plan = plan
        self.steps: dict[Path, dict[Path, WeightHandle]] = {
            s.path: {f: stack.enter_context(open_weights(f)) for f in s.weights.files} for s in plan.steps}

    def adapter_tensor(self, step: Step, key: str) -> torch.Tensor:
        return self.steps[step.path][step.weights.file_of[key]].get(key)

    def compute(self, name: str, base: WeightHandle) -> torch.Tensor:
        """The merged tensor ``name`` in the output dtype (float32 arithmetic)."""
        ops = self.plan.ops[name]
        last = max((i for i, op in enumerate(ops) if op.kind == "replace"), default=None)
        if last is None:
            w = base.get(self.plan.source[name])
        else:  # the base (or an earlier replacement) would be overwritten: never read it
            step = ops[last].step
            w = self.adapter_tensor(step, step.replacements[name])
        loras = ops[(last + 1) if last is not None else 0:]
        if loras:  # float32 copy: updated in place below, and inputs may be shared or mapped
            w = w.to(torch.float32, copy=True)
        for op in loras:
            a_key, b_key, scale, emb = op.step.loras[name]
            a = self.adapter_tensor(op.step, a_key).to(torch.float32)  # (r, in)
            b = self.adapter_tensor(op.step, b_key).to(torch.float32)  # (out, r)
            if emb:
                w.addmm_(a.T, b.T, alpha=scale)  # peft's embedding delta is (B @ A).T
            else:
                w.addmm_(b, a, alpha=scale)
        out = w.to(self.plan.dtype) if w.is_floating_point() else w
        if out.is_floating_point() and not torch.isfinite(out).all():
            raise YakError(f"merged tensor {name} has NaN or inf values in {self.plan.dtype} (from "
                           f"{[str(op.step.path) for op in ops] or 'the base model'}); nothing was written. "
                           "Check the adapters, or try --dtype bfloat16/float32")
        return out


def iter_merged(plan: Plan) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every output tensor in order, one base file open at a time."""
    with ExitStack() as stack:
        inputs = _Inputs(plan, stack)
        bar = tqdm(total=len(plan.order), desc="merge", unit="tensor")
        for f in plan.base.files:
            names = [k for k in plan.order if plan.group[k] == f]
            if not names:
                continue
            with open_weights(f) as base:
                for name in names:
                    logger.debug("%s %s %s from %s", name, tuple(plan.shapes[name]),
                                 str(plan.dtype).removeprefix("torch."), f.name)
                    yield name, inputs.compute(name, base)
                    bar.update()
        bar.close()
