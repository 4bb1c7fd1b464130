"""Long-term forecasting on the ETT data with memdsl rules: data (the Time-Series-Library protocol of
../shared/data/README.md), forecasters around a 2-D rule or a 1-D rule per variate, training, evaluation.

Protocol: ETTh splits at rows [0, 8640, 11520, 14400]; validation and test windows start `lookback` rows
earlier; standard scaling fitted on the training rows only; every window with stride 1; MSE and MAE on the
normalised scale over all channels. The model normalises each input window (RevIN-style, as iTransformer
and PatchTST do) and predicts in that frame; errors are measured after undoing it. With `cycle` P > 0 the model
also does CycleNet's residual cycle forecasting (Lin et al., NeurIPS 2024): a learned cycle Q [P, V] aligned
to each window's phase (its first row's index in the whole csv, mod P) is removed from the normalised input
and the cycle aligned to the horizon is added to the forecast, so windows carry their row index.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import math
import pathlib
import time

import numpy as np
import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "ltsf"
BORDERS = {"ETTh1": (0, 8640, 11520, 14400), "ETTh2": (0, 8640, 11520, 14400)}


def data_path(name: str = "ETTh1") -> pathlib.Path | None:
    """The csv.gz file, or None when ../shared/data is absent (callers skip)."""
    path = DATA / f"{name}.csv.gz"
    return path if path.exists() else None


def load_splits(name: str = "ETTh1", lookback: int = 96) -> dict[str, np.ndarray]:
    """{"train", "val", "test"}: float32 arrays [rows, variates], scaled with the training rows' mean/std."""
    path = data_path(name)
    if path is None:
        raise FileNotFoundError(f"{DATA / name}.csv.gz is missing; see README.md (Data) for the originals")
    with gzip.open(path, "rt") as f:
        rows = [line.rstrip("\n").split(",")[1:] for line in f][1:]
    x = np.asarray(rows, dtype=np.float64)
    b = BORDERS[name]
    mean, std = x[b[0]:b[1]].mean(0), x[b[0]:b[1]].std(0)
    x = ((x - mean) / std).astype(np.float32)
    return {"train": x[b[0]:b[1]], "val": x[b[1] - lookback:b[2]], "test": x[b[2] - lookback:b[3]],
            "starts": {"train": b[0], "val": b[1] - lookback, "test": b[2] - lookback}}


def window_rows(series: np.ndarray, lookback: int, horizon: int, start: int = 0) -> torch.Tensor:
    """The row of each stride-1 window's first input step in the whole series ([N] int64), for a split that
    begins at row `start` (load_splits' "starts"): window i of `windows` begins at row start + i."""
    return torch.arange(len(series) - lookback - horizon + 1, dtype=torch.int64) + start


def windows(series: np.ndarray, lookback: int, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All stride-1 windows: inputs [N, lookback, V] and targets [N, horizon, V]."""
    n = len(series) - lookback - horizon + 1
    idx = np.arange(n)[:, None]
    x = series[idx + np.arange(lookback)[None]]
    y = series[idx + lookback + np.arange(horizon)[None]]
    return torch.from_numpy(x), torch.from_numpy(y)


# ---- models ---------------------------------------------------------------------------------------

_ACT = {"sigmoid": torch.sigmoid, "softplus": nn.functional.softplus, "exp": torch.exp,
        "identity": lambda x: x, "tanh": torch.tanh, "silu": nn.functional.silu}


class RuleMixer(nn.Module):
    """One residual token mixer around a memdsl rule: q, k, v and gate projections, the rule, an output
    projection. 2-D rules see the grid [B, T, V, d]; a 1-D rule runs on each variate's sequence alone."""

    def __init__(self, rule_path: str, d_model: int, n_heads: int, tile: tuple[int, int] | None = None,
                 gate_bias: dict[str, list[float]] | None = None, backend: str = "auto"):
        super().__init__()
        self.backend = backend  # 2-D rules: "auto" (the rule's algorithm), "wavefront" (exact), "tiles"
        from memdsl.driver import load_ast
        from memdsl.twod import compile_2d, is_2d
        self.two_d = is_2d(load_ast(rule_path)[0])
        if self.two_d:
            self.rule = compile_2d(rule_path, tile=tile)
            gates, memory = self.rule.spec1d["gates"], self.rule.init_memory
        else:
            import memdsl
            self.rule = memdsl.compile(rule_path)
            gates = self.rule.spec["gates"]
            memory = None
        self.H, self.dh = n_heads, d_model // n_heads
        self.gate_names = sorted(gates)
        self.acts = [_ACT[gates[g]["activation"]] for g in self.gate_names]
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.gates = nn.Linear(d_model, n_heads * len(self.gate_names))
        with torch.no_grad():  # per-head gate biases: where each head's steps start (e.g. Chimera's two heads)
            bias = self.gates.bias.view(len(self.gate_names), n_heads)
            bias.zero_()
            for i, g in enumerate(self.gate_names):
                if gate_bias and g in gate_bias:
                    bias[i] = torch.tensor(gate_bias[g])
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.norm = nn.LayerNorm(d_model)
        self.memory = nn.ParameterDict()
        if memory is not None:  # learned initial memory per head
            sz = {"d": self.dh}
            for name, w in memory(n_heads, self.rule.module.sizes(sz), {}, torch.float32, None).items():
                self.memory[name] = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, V, d]
        B, T, V, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, V, 3, self.H, self.dh).unbind(3)
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        g = self.gates(x).view(B, T, V, len(self.gate_names), self.H)
        gates = {n: act(g[..., i, :]) for i, (n, act) in enumerate(zip(self.gate_names, self.acts, strict=True))}
        if self.two_d:
            y, _ = self.rule(q, k, v, gates, dict(self.memory.items()), backend=self.backend)
        else:  # per variate: [B * V, T, H, dh]
            def fold(t):
                return t.transpose(1, 2).reshape(B * V, T, *t.shape[3:])
            y, _ = self.rule(fold(q), fold(k), fold(v), {n: fold(t) for n, t in gates.items()})
            y = y.reshape(B, V, T, self.H, self.dh).transpose(1, 2)
        return self.norm(x + self.out(y.reshape(B, T, V, -1)))


class CellMLP(nn.Module):
    """A residual per-cell MLP (channel mixing over the d features of each cell (t, v)), the second half of a
    transformer block: the rule mixes across cells, this mixes within one."""

    def __init__(self, d_model: int, expand: int = 2, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, expand * d_model), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(expand * d_model, d_model))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.net(x))


class Forecaster(nn.Module):
    """Window-normalised input -> cell embedding (value, variate, time) -> mixers -> per-variate linear head,
    plus a per-variate linear map of the input window (the DLinear-style path; `mixers=[]` is that alone).

    With `cycle` P > 0, CycleNet's residual cycle forecasting around all of it, in the order of CycleNet's code
    (models/CycleNet.py): normalise the window, subtract the learned cycle Q[(row + t) mod P] (row: the window's
    first row in the whole series, `rows` of forward), forecast the residual, add Q[(row + L + s) mod P], undo
    the normalisation. Q starts at zero, so the model starts as the one without the cycle."""

    def __init__(self, lookback: int, horizon: int, n_vars: int, d_model: int, mixers: list[nn.Module],
                 dropout: float = 0.0, cycle: int = 0, head_rank: int = 0, zero_head: bool = False):
        super().__init__()
        self.cycle = nn.Parameter(torch.zeros(cycle, n_vars)) if cycle else None
        self.value = nn.Linear(1, d_model)
        self.drop = nn.Dropout(dropout)  # on the head's input features (PatchTST's head dropout): the head is most
        # of the parameters at long horizons (L * d * horizon) and fits the 8,640 training windows too closely
        self.var_emb = nn.Parameter(torch.randn(n_vars, d_model) * 0.02)
        self.time_emb = nn.Parameter(torch.randn(lookback, d_model) * 0.02)
        self.mixers = nn.ModuleList(mixers)
        self.skip_mixers = False  # the linear path (and cycle) alone: train_two_stage's first stage
        # head_rank r > 0: each cell's d features are first projected to r (a d x r map shared by all cells), so
        # the head has L * r * horizon weights instead of L * d * horizon: the mixer's output becomes r learned
        # series next to the input, read by a map as small as the linear path's (at 720: 553k -> 69k per r)
        self.head_proj = nn.Linear(d_model, head_rank, bias=False) if mixers and head_rank else None
        self.head = nn.Linear(lookback * (head_rank or d_model), horizon) if mixers else None
        if self.head is not None and zero_head:  # the model starts as the linear path alone (a zero residual
            nn.init.zeros_(self.head.weight)     # branch, as ReZero / zero-init of a ResNet block's last layer)
            nn.init.zeros_(self.head.bias)
        self.linear = nn.Linear(lookback, horizon)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, V] -> [B, horizon, V]; `rows` [B]: each window's first row in the whole series (needed
        with a cycle, ignored without)."""
        mu = x.mean(1, keepdim=True)
        sd = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5)
        xn = (x - mu) / sd
        if self.cycle is not None:
            if rows is None:
                raise ValueError("a forecaster with a cycle needs each window's row index (rows)")
            xn = xn - self._cycle(rows, 0, x.shape[1])
        out = self.linear(xn.transpose(1, 2))
        if self.mixers and not self.skip_mixers:
            h = self.value(xn.unsqueeze(-1)) + self.var_emb[None, None] + self.time_emb[None, :, None]
            for m in self.mixers:
                h = m(h)
            if self.head_proj is not None:
                h = self.head_proj(h)
            B, L, V, d = h.shape
            out = out + self.head(self.drop(h.transpose(1, 2).reshape(B, V, L * d)))
        out = out.transpose(1, 2)
        if self.cycle is not None:
            out = out + self._cycle(rows, x.shape[1], out.shape[1])
        return out * sd + mu

    def _cycle(self, rows: torch.Tensor, offset: int, length: int) -> torch.Tensor:
        """Q at the phases of steps offset .. offset + length - 1 of each window: [B, length, V]."""
        phase = (rows.to(self.cycle.device)[:, None] + offset + torch.arange(length, device=self.cycle.device)
                 ) % self.cycle.shape[0]
        return self.cycle[phase]


MODELS = {
    # name: (rule file, per-head gate biases before the activation); two heads per layer
    "chimera": ("rules/chimera.mem", {"dt": [-4.0, 0.0], "dv": [0.0, 0.0]}),   # head 0 small Δ1, head 1 large
    "mamba2d": ("rules/mamba2d.mem", {"dt": [-4.0, 0.0], "dv": [0.0, 0.0]}),
    "hydra": ("rules/hydra.mem", {"eta": [-2.0, -2.0], "dt": [-4.0, 0.0], "dv": [0.0, 0.0]}),
    "gated_deltanet_per_variate": ("rules/gated_deltanet.mem", {"beta": [-1.0, -1.0], "alpha": [3.0, 3.0]}),
    "linear": (None, None),
    "embed_head": ("identity", None),  # control: the embedding and head of the mixer models, no mixer
}


def build_model(name: str, lookback: int, horizon: int, n_vars: int, d_model: int = 16, n_heads: int = 2,
                tile: tuple[int, int] | None = None, backend: str = "auto", dropout: float = 0.0, *,
                layers: int = 1, mlp: int = 0, gate_bias: dict[str, list[float]] | None = None,
                cycle: int = 0, head_rank: int = 0, zero_head: bool = False) -> Forecaster:
    """`layers` stacked blocks, each the rule mixer followed (with `mlp` > 0) by a per-cell MLP of hidden size
    mlp * d_model; `gate_bias` overrides entries of the model's per-head gate biases. The `embed_head` control
    keeps the per-cell MLPs and drops only the rule mixers, so it is the same model without them. `cycle` P > 0:
    CycleNet's residual cycle forecasting with a learned cycle of P steps (Forecaster; any model). `head_rank`
    r > 0: a low-rank head (each cell's features projected to r before the map to the horizon); `zero_head`: the
    head starts at zero."""
    path, bias = MODELS[name]
    if gate_bias:
        bias = {**(bias or {}), **gate_bias}
    blocks: list[nn.Module] = []
    if path is not None:
        for _ in range(layers):
            blocks.append(nn.Identity() if path == "identity"
                          else RuleMixer(str(ROOT / path), d_model, n_heads, tile, bias, backend))
            if mlp:
                blocks.append(CellMLP(d_model, mlp))
    return Forecaster(lookback, horizon, n_vars, d_model, blocks, dropout, cycle, head_rank, zero_head)


def is_linear_path(name: str) -> bool:
    """A Forecaster parameter of the linear path or the cycle (CycleNet/Linear's part of the model)."""
    return name.startswith(("linear.", "cycle"))


def cosine_adam(model: nn.Module, lr: float, steps: int, weight_decay: float = 0.0, mixer_lr: float | None = None):
    """Adam with a cosine decay to zero over `steps` (every training script here uses this schedule); with
    `weight_decay`, AdamW's decoupled decay. With `mixer_lr`, a Forecaster's linear path and cycle train at `lr`
    and everything else (embedding, mixers, head) at `mixer_lr`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if mixer_lr is not None:
        params = [{"params": [p for n, p in named if is_linear_path(n)]},
                  {"params": [p for n, p in named if not is_linear_path(n)], "lr": mixer_lr}]
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if weight_decay
           else torch.optim.Adam(params, lr=lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    return opt, sched


def optimizer_step(opt, sched, loss: torch.Tensor) -> None:
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def train_and_test(model: nn.Module, splits: dict, lookback: int, horizon: int, steps: int, batch: int = 32,
                   lr: float = 1e-3, seed: int = 0, log=print, test_limit: int | None = None,
                   val_every: int = 0, weight_decay: float = 0.0, ema: float = 0.0,
                   patience: int = 0, mixer_lr: float | None = None,
                   validate_first: bool = False) -> dict[str, float]:
    """A fixed budget of Adam steps on random training windows; MSE/MAE on every test window. With `val_every`,
    the validation MSE is measured every that many steps (and at the end) and the weights with the best one are
    tested (early stopping by model selection, as the published models do). With `ema` (a decay, e.g. 0.999)
    an exponential moving average of the weights is what is validated, selected and tested; the raw weights'
    best validation MSE is recorded beside it (`val_mse_raw`: the same training run without the average).
    With `patience` (and `val_every`), training stops once that many validations in a row have not improved on
    the best (early stopping, as CycleNet and the Time-Series-Library train: patience 5 epochs); the learning-rate
    schedule still spans `steps`. Only parameters that require grad train (`only_training`). `validate_first`:
    the starting weights are validated too, and stay a candidate (best_step 0). Each window's row in the whole
    series goes to the model (`rows`); `splits["starts"]` (load_splits) gives each split's first row (0 where
    absent)."""
    torch.manual_seed(seed)
    starts = splits.get("starts", {})
    xtr, ytr = windows(splits["train"], lookback, horizon)
    rtr = window_rows(splits["train"], lookback, horizon, starts.get("train", 0))
    opt, sched = cosine_adam(model, lr, steps, weight_decay, mixer_lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    best = None
    # the average lives beside the model (the compiled rules do not deep-copy) and is swapped in to be judged
    shadow = {n: p.detach().clone() for n, p in model.named_parameters()} if ema else None
    best_raw = math.inf
    stopped_at = None
    if val_every and validate_first:
        val = evaluate(model, splits["val"], lookback, horizon, start=starts.get("val", 0))[0]
        best = (val, 0, copy.deepcopy(model.state_dict()))
        log(f"  step     0  validation mse {val:.4f}")
    model.train()
    for step in range(steps):
        idx = torch.randint(len(xtr), (batch,), generator=gen)
        loss = nn.functional.mse_loss(model(xtr[idx], rtr[idx]), ytr[idx])
        optimizer_step(opt, sched, loss)
        if shadow is not None:  # a plain mean of the steps so far until 1 / (1 - ema) of them: no init bias
            with torch.no_grad():
                w = max(1 - ema, 1 / (step + 1))
                for n, p in model.named_parameters():
                    shadow[n].lerp_(p, w)
        if step % max(1, steps // 5) == 0:
            log(f"  step {step:5d}  train mse {loss.item():.4f}  {time.perf_counter() - t0:.0f}s")
        if val_every and ((step + 1) % val_every == 0 or step + 1 == steps):
            raw = ""
            if shadow is not None:
                v = evaluate(model, splits["val"], lookback, horizon, start=starts.get("val", 0))[0]
                best_raw = min(best_raw, v)
                raw = f"  (raw weights {v:.4f})"
            with _swapped(model, shadow):
                val = evaluate(model, splits["val"], lookback, horizon, start=starts.get("val", 0))[0]
                if best is None or val < best[0]:
                    best = (val, step + 1, copy.deepcopy(model.state_dict()))
            model.train()
            log(f"  step {step + 1:5d}  validation mse {val:.4f}{raw}{'  (best)' if best[1] == step + 1 else ''}")
            if patience and step + 1 - best[1] >= patience * val_every:
                log(f"  early stop: no better validation in the last {patience}")
                stopped_at = step + 1
                break
    train_s = time.perf_counter() - t0
    extra = {}
    if shadow is not None:  # without validation: the average of the last steps is tested
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(shadow[n])
        extra["ema"] = ema
    if best is not None:
        model.load_state_dict(best[2])
        extra.update(val_mse=best[0], best_step=best[1], val_every=val_every)
        if stopped_at is not None:
            extra["stopped_at"] = stopped_at
        if shadow is not None:
            extra["val_mse_raw"] = best_raw
    mse, mae = evaluate(model, splits["test"], lookback, horizon, limit=test_limit, start=starts.get("test", 0))
    return {"mse": mse, "mae": mae, "train_s": train_s, "eval_s": time.perf_counter() - t0 - train_s, **extra}


@contextlib.contextmanager
def only_training(model: nn.Module, trainable):
    """Within the block only the parameters with `trainable(name)` require grad (cosine_adam takes only those);
    the others are frozen and come back after it."""
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and not trainable(n)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


@contextlib.contextmanager
def _swapped(model: nn.Module, params: dict[str, torch.Tensor] | None):
    """Within the block the model holds `params` (None: unchanged); its own weights come back after it."""
    if params is None:
        yield
        return
    with torch.no_grad():
        own = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.copy_(params[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(own[n])


@torch.no_grad()
def evaluate(model: nn.Module, series: np.ndarray, lookback: int, horizon: int, batch: int = 256,
             limit: int | None = None, start: int = 0) -> tuple[float, float]:
    """MSE and MAE over every window of `series` (or the first `limit`, for quick checks only); `start`: the
    series' first row in the whole csv (the windows' phases for a model with a cycle)."""
    model.eval()
    x, y = windows(series, lookback, horizon)
    rows = window_rows(series, lookback, horizon, start)
    x, y, rows = x[:limit], y[:limit], rows[:limit]
    se = ae = 0.0
    for i in range(0, len(x), batch):
        p = model(x[i:i + batch], rows[i:i + batch])
        se += (p - y[i:i + batch]).pow(2).sum().item()
        ae += (p - y[i:i + batch]).abs().sum().item()
    n = y.numel()
    return se / n, ae / n


def train_two_stage(model: Forecaster, splits: dict, lookback: int, horizon: int, steps: int, batch: int,
                    lr: float, mixer_lr: float, log=print, **kw) -> dict:
    """Stage 1: the linear path and the cycle alone (CycleNet/Linear; the mixers are skipped), `lr`. Stage 2:
    those frozen, the embedding, mixers and head learn the residual at `mixer_lr`, from a zero head, so stage 2
    starts at stage 1's model; it is validated first and stays a candidate. Each stage early-stops on
    validation (kw: val_every, patience, seed, ...). Why: trained jointly, the mixer overfits long horizons
    within a few hundred steps and early stopping then cuts the linear path's training short (it still
    improves at step 1000 alone)."""
    if model.head is None or any(p.detach().abs().sum() > 0 for p in model.head.parameters()):
        raise ValueError("two-stage training needs a forecaster with mixers and a zero head (zero_head=True)")
    log("  stage 1: the linear path and cycle")
    model.skip_mixers = True
    try:
        with only_training(model, is_linear_path):
            first = train_and_test(model, splits, lookback, horizon, steps, batch, lr, log=log, **kw)
    finally:
        model.skip_mixers = False
    log("  stage 2: the mixers and head on the residual")
    with only_training(model, lambda n: not is_linear_path(n)):
        second = train_and_test(model, splits, lookback, horizon, steps, batch, mixer_lr, log=log,
                                validate_first=True, **kw)
    stage1 = {k: first[k] for k in ("mse", "mae", "val_mse", "best_step", "stopped_at", "train_s") if k in first}
    return {**second, "train_s": first["train_s"] + second["train_s"], "stage1": stage1}
