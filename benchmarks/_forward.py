"""What the model's own forward passes cost inside a run, for any family.

    name = query_network(model)                    # "unet", "bart", ... (rule below)
    with ForwardClock(model, name) as clock:       # hooks on every module of every component
        compute_signals(model, batch, ["loss"], seed=0)
    clock.seconds        # {"unet": s, "text_encoder": s, "vae": s}: time inside each component
    clock.queries(32)    # rows the query network ran / 32: model passes per sample, as counted
    forward = replay(clock.calls[0], rows=32)      # one forward of the query network at batch 32
    forward()

Rules:
- The query network (the "model passes" a gray-box signal or a sampler counts) is the direct
  child of the family module with the most trainable parameters: the UNet, BART, an MMDiT. (The
  benchmarks build models without EMA, whose shadow copies would be queried instead.)
- A component is a direct child with parameters; time inside it runs from the outermost entry
  into any of its modules to the matching exit (so `bart.model.decoder(...)` called directly
  counts for `bart`). On CUDA the clock synchronises at each outermost entry and exit, which
  costs a little: headline ratios come from runs without hooks, the clock only splits time.
- A call is replayed with its own arguments, each tensor whose first dimension is the call's
  batch cut (or tiled) to `rows`; a call with any argument that is not a tensor, number,
  string or None (a KV cache, say) cannot be replayed (`replayable` is False).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from _common import stopwatch
from torch import nn

PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def query_network(model: nn.Module) -> str:
    """Name of the direct child with the most trainable parameters (module docstring)."""
    children = [(trainable_parameters(m), name) for name, m in model.named_children()]
    if not children or max(children)[0] == 0:
        raise ValueError(f"{type(model).__name__} has no trainable child to count passes of")
    return max(children)[1]


def batch_rows(args: tuple, kwargs: dict) -> int:
    """The batch of a call: the first dimension of its first tensor of rank >= 1 (0 if none)."""
    for value in [*args, *kwargs.values()]:
        if torch.is_tensor(value) and value.ndim >= 1:
            return int(value.shape[0])
    return 0


@dataclass
class Call:
    """One outermost call into the query network: the module called and its arguments."""

    module: nn.Module
    args: tuple
    kwargs: dict
    rows: int

    @property
    def replayable(self) -> bool:
        return all(
            torch.is_tensor(v) or isinstance(v, PLAIN) for v in [*self.args, *self.kwargs.values()]
        )


@dataclass
class ForwardClock:
    """Context manager: seconds inside each component and the query network's calls."""

    model: nn.Module
    network: str
    seconds: dict[str, float] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)  # the query network's outermost calls
    other_calls: list[Call] = field(default_factory=list)  # every other component's

    def __post_init__(self) -> None:
        self._depth: dict[str, int] = {}
        self._start: dict[str, float] = {}
        self._handles: list[Any] = []
        self._cuda = next(self.model.parameters()).device.type == "cuda"

    def _enter(self, component: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        depth = self._depth.get(component, 0)
        self._depth[component] = depth + 1
        if depth:
            return
        if self._cuda:
            torch.cuda.synchronize()
        self._start[component] = time.perf_counter()
        call = Call(module, args, dict(kwargs), batch_rows(args, kwargs))
        (self.calls if component == self.network else self.other_calls).append(call)

    def _exit(self, component: str) -> None:
        self._depth[component] -= 1
        if self._depth[component]:
            return
        if self._cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start[component]
        self.seconds[component] = self.seconds.get(component, 0.0) + elapsed

    def __enter__(self) -> ForwardClock:
        for component, child in self.model.named_children():
            if not any(True for _ in child.parameters()):
                continue
            for module in child.modules():
                self._handles.append(
                    module.register_forward_pre_hook(
                        lambda m, a, k, c=component: self._enter(c, m, a, k), with_kwargs=True
                    )
                )
                self._handles.append(
                    module.register_forward_hook(
                        lambda m, a, o, c=component: self._exit(c), always_call=True
                    )
                )
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def queries(self, samples: int) -> float:
        """Rows the query network ran, per sample: its passes per sample, as counted."""
        return sum(c.rows for c in self.calls) / max(1, samples)


def _resized(value: Any, call_rows: int, rows: int) -> Any:
    if not torch.is_tensor(value) or value.ndim == 0 or value.shape[0] != call_rows:
        return value
    if call_rows < rows:
        value = value.repeat(-(-rows // call_rows), *([1] * (value.ndim - 1)))
    return value[:rows]


def replay(call: Call, rows: int | None = None) -> Any:
    """A function that runs `call` again (no grad), its batch cut or tiled to `rows`."""
    if not call.replayable:
        raise ValueError(f"a call of {type(call.module).__name__} with non-tensor state")
    rows = call.rows if rows is None else rows
    args = tuple(_resized(a, call.rows, rows) for a in call.args)
    kwargs = {k: _resized(v, call.rows, rows) for k, v in call.kwargs.items()}

    @torch.no_grad()
    def forward() -> Any:
        return call.module(*args, **kwargs)

    return forward


def reference_call(calls: list[Call], rows: int) -> Call:
    """The first replayable call of exactly `rows` rows, else the first replayable one."""
    usable = [c for c in calls if c.replayable]
    if not usable:
        raise ValueError("no replayable call of the query network was recorded")
    return next((c for c in usable if c.rows == rows), usable[0])


def batched_replays(calls: list[Call], rows: int) -> tuple[list[Callable[[], Any]], list[str]]:
    """The passes `calls` would be at `rows` rows a pass: per module called, one replayable
    call of it (of exactly `rows` rows if there is one) replayed whole `rows`-row batches and a
    remainder until it covers every row the calls ran; and the names of modules whose calls
    cannot be replayed (left out)."""
    by_module: dict[int, list[Call]] = {}
    for call in calls:
        by_module.setdefault(id(call.module), []).append(call)
    runs, skipped = [], []
    for group in by_module.values():
        usable = [c for c in group if c.replayable and c.rows]
        if not usable:
            skipped.append(type(group[0].module).__name__)
            continue
        ref = next((c for c in usable if c.rows == rows), usable[0])
        full, rest = divmod(sum(c.rows for c in group), rows)
        runs += [replay(ref, rows)] * full + ([replay(ref, rest)] if rest else [])
    return runs, sorted(set(skipped))


def breakdown(seconds: dict[str, float], total: float, samples: int) -> str:
    """`unet 9.8 ms (80%), vae 1.1 ms (9%), other 1.3 ms (11%)` per sample, largest first."""
    parts = {**seconds, "other": max(0.0, total - sum(seconds.values()))}
    ordered = sorted(parts.items(), key=lambda kv: -kv[1])
    return ", ".join(
        f"{name} {1e3 * s / samples:.2f} ms ({100 * s / total:.0f}%)" for name, s in ordered
    )


@dataclass(frozen=True)
class Timing:
    """Seconds of one run over alternated rounds: each round's wall and CPU time (all
    threads), and their best and median."""

    walls: tuple[float, ...]
    cpus: tuple[float, ...]

    @property
    def best(self) -> float:  # other load only ever adds time: the least disturbed round
        return min(self.walls)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    def over(self, other: Timing, cpu: bool = False) -> float:
        """Median over rounds of this run's time / `other`'s in the same round: the pairs ran
        back to back, so load that drifts between rounds cancels."""
        mine, theirs = (self.cpus, other.cpus) if cpu else (self.walls, other.walls)
        return statistics.median(a / b for a, b in zip(mine, theirs))


def alternate(runs: dict[str, Callable[[], Any]], rounds: int, device: str) -> dict[str, Timing]:
    """{name: Timing} of each run, the runs alternating round by round so that drifting load
    hits all of them alike."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            with stopwatch(device) as elapsed:
                run()
            times[name].append((elapsed[0], elapsed[1]))
    return {
        name: Timing(tuple(w for w, _ in ts), tuple(c for _, c in ts)) for name, ts in times.items()
    }


def clocked(model: Any, network: str, run: Callable[[], Any]) -> tuple[ForwardClock, float]:
    """(the clock of one hooked run, its wall seconds)."""
    device = str(model.device)
    with ForwardClock(model, network) as clock, stopwatch(device) as elapsed:
        run()
    return clock, elapsed[0]


def uniform_replay(calls: list[Call]) -> Callable[[], Any] | None:
    """A replay of the first call when every call can be replayed and has the same batch (a
    sampler's steps), else None (a KV-cached decoder's steps grow: not one forward repeated)."""
    if not calls or not all(c.replayable and c.rows == calls[0].rows for c in calls):
        return None
    return replay(calls[0])
