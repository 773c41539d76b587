"""AdaLoRA (Zhang et al. 2023, arXiv:2303.10512; shared/METHODS.md §5): LoRA in SVD form with a rank budget.

    h = W0·x + (s / (ranknum + 1e-5)) · P·Λ·Q·dropout(x)      P = lora_B (d_out × r), Λ = diag(lora_E) (r × 1),
                                                            Q = lora_A (r × d_in), s = lora_alpha, ranknum = init_r

Training adds three things, each through a training-side seam of the registry (the loop knows no method):

* loss_term: γ·R with R = mean over every P and Q of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (peft's non-squared
  Frobenius norms; the paper squares them), γ = orth_reg_weight;
* step_hook, after each optimizer step (gradients still present): the sensitivity I = |θ ⊙ ∇θ| smoothed
  twice, Ī ← β1·Ī + (1−β1)·I and Ū ← β2·Ū + (1−β2)·|I − Ī|, s = Ī·Ū; a triplet's score is
  S_i = s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji); the budget b(t) (singular values over all layers) is
  b0 = init_r·n until tinit, then b_T + (b0 − b_T)·(1 − (t − tinit)/(T − tfinal − tinit))³ (truncated to an
  int, as peft), b_T = target_r·n from T − tfinal on; every deltaT steps the Λ entries with S ≤ the
  (b0 − b)-th smallest score are set to 0 (a soft mask: P and Q stay and Λ may regrow until the next mask),
  and the allocation is recorded as the config's `rank_pattern` (`deltatune.update_config`). At T − tfinal the
  allocation is final (scores are reset, as peft does) and re-applied after every later step;
* fit_run: `total_step` (T) is filled from max_steps and checked before anything is built; save_view: the
  file holds only the surviving triplets with the `rank_pattern`, which is how peft's files are shrunk.

The live adapter keeps its full init_r size during the whole run (masks only), so checkpoints hold the full
tensors and resume exactly; only the saved file is pruned. A pruned file loads at its pruned ranks (peft's
`resize_modules_by_rank_pattern`), with ranknum still init_r, so the scale does not change. Step counting and
call order follow peft's `update_and_allocate(global_step)` with the loop's step (from 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import update_config
from ..core.config import AdapterConfig, ConfigError, check_positive_int, check_range
from ..core.delta import Delta
from ..core.lowrank import LowRankFactors
from ..core.registry import SavedView, register
from ..core.sites import Stage, Target, weight_kind
from ..train.distributed import agree
from ..train.hooks import Hook
from .lora import DEFAULT_TARGETS, trained_biases

# Keys peft 0.21 writes in an ADALORA adapter_config.json (its LoraConfig's) that AdaLoRA does not use, at "off".
_PEFT_ONLY = {
    "megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
    "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
    "monteclora_config": None, "layer_replication": None, "lora_bias": False, "target_parameters": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False,
    "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
}


@dataclass(frozen=True)
class AdaLoraConfig(AdapterConfig):
    """peft's `AdaLoraConfig` (its LoraConfig fields, `r` unused, plus the budget schedule), same names and defaults.

    init_r / target_r: the rank each layer starts with / the average rank the budget ends at (b_T = target_r·n).
    tinit / tfinal: steps before the budget starts shrinking / steps at the final budget at the end.
    deltaT: steps between two maskings in the shrinking phase. beta1 / beta2: the two moving averages.
    orth_reg_weight: γ on the orthogonality penalty. total_step: T; the training loop fills it from max_steps.
    rank_pattern: "<module>.lora_E" -> which of the init_r triplets survive (written by the run; a file
        carrying it holds only the surviving ones).
    """

    peft_type: ClassVar[str] = "ADALORA"
    recommended_lr: ClassVar[float] = 1e-3  # the paper's GLUE runs use 5e-4 to 1.2e-3 (DeBERTaV3-base, Table 9)
    peft_only_defaults: ClassVar[Mapping[str, Any]] = _PEFT_ONLY
    default_target_modules: ClassVar[Mapping[str, tuple[str, ...]]] = DEFAULT_TARGETS
    updatable_fields: ClassVar[tuple[str, ...]] = ("rank_pattern",)

    r: int = 8  # peft keeps LoRA's r in the file; AdaLoRA ignores it (init_r is the rank)
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    init_lora_weights: bool = True
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, Any] | None = None

    def validate(self) -> None:
        check_positive_int("init_r", self.init_r)
        check_positive_int("target_r", self.target_r)
        check_positive_int("deltaT", self.deltaT)
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): the budget only shrinks")
        for key in ("tinit", "tfinal"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        for key in ("beta1", "beta2"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"{key} must be in (0, 1), got {getattr(self, key)}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.total_step is not None:
            check_positive_int("total_step", self.total_step)
            _check_schedule(self, self.total_step, "total_step")
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, (list, tuple)) or not all(isinstance(v, bool) for v in mask) or len(mask) != self.init_r:
                raise ConfigError(f"rank_pattern[{key!r}] must be a list of init_r={self.init_r} true/false values, got {mask!r}")

    def ranks(self, module_name: str) -> int:
        """The rank this module is built with: the surviving triplets of a pruned file, else init_r."""
        mask = (self.rank_pattern or {}).get(f"{module_name}.lora_E")
        return self.init_r if mask is None else sum(mask)


def _check_schedule(config: AdaLoraConfig, total: int, name: str) -> None:
    if config.tinit >= total - config.tfinal:
        raise ConfigError(
            f"AdaLoRA's budget schedule does not fit {name}={total}: tinit ({config.tinit}) must be below {name} − tfinal "
            f"({total} − {config.tfinal} = {total - config.tfinal}), leaving steps to shrink the budget; lower tinit/tfinal "
            "or train longer")


class AdaLoraLinear(Delta):
    """ΔW = s/(ranknum + 1e-5) · B·(A ⊙ E) on nn.Linear, GPT-2 Conv1D or a quantized linear (peft's SVDLinear)."""

    additive = True

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return weight_kind(module) in ("linear", "conv1d")

    def __init__(self, target: Target, config: AdaLoraConfig) -> None:
        super().__init__(target, config)
        r = config.ranks(target.name)
        d_out, d_in = target.weight.shape
        self.scaling = (config.lora_alpha if config.lora_alpha > 0 else float(config.init_r)) / (config.init_r + 1e-5)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.randn(r, d_in))  # Q (r, d_in)
        self.lora_E = nn.Parameter(torch.randn(r, 1))  # Λ (r, 1)
        self.lora_B = nn.Parameter(torch.randn(d_out, r))  # P (d_out, r)
        if config.init_lora_weights:  # peft: Λ = 0, P and Q ~ N(0, 0.02); the adapted model equals the base
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        return y + (F.linear(F.linear(x, self.lora_A * self.lora_E), self.lora_B) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling  # (d_out, d_in)

    def low_rank_factors(self) -> LowRankFactors:
        """(Λ ⊙ Q, P, s): the low-rank view the serving kernels and LoRA exports read (deltatune.core.lowrank)."""
        return LowRankFactors(self.lora_A * self.lora_E, self.lora_B, float(self.scaling))

    def merge(self, weight, bias):
        return weight + self.delta_weight().to(weight.dtype), bias

    def unmerge(self, weight, bias):
        return weight - self.delta_weight().to(weight.dtype), bias


def _deltas(model: nn.Module, name: str) -> list[tuple[str, AdaLoraLinear]]:
    from ..core.model import adapters

    return list(adapters(model)[name].deltas(model))


# ---- the orthogonality penalty (loss_term) -----------------------------------------------------------------
def orthogonality_penalty(model: nn.Module, config: AdaLoraConfig, name: str) -> torch.Tensor:
    """γ·R, R = mean over all Q and P of ‖QQᵀ − I‖_F, ‖PᵀP − I‖_F (peft's AdaLoraModel.forward)."""
    norms = []
    for _, delta in _deltas(model, name):
        for cov in (delta.lora_A @ delta.lora_A.T, delta.lora_B.T @ delta.lora_B):  # (r, r) each
            norms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return config.orth_reg_weight * torch.stack(norms).mean()


# ---- the budget schedule and masking (step_hook) -----------------------------------------------------------
class RankAllocator(Hook):
    """Importance scores and budget masks of one AdaLoRA adapter; its state goes into checkpoints."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, name: str) -> None:
        if config.total_step is None:
            raise ConfigError("AdaLoRA needs total_step to train (the training loop fills it from max_steps); set "
                              "adapter.total_step to the number of optimizer steps")
        self.model, self.name = model, name
        deltas = _deltas(model, name)
        self.init_budget = sum(delta.lora_A.shape[0] for _, delta in deltas)
        self.target_budget = config.target_r * len(deltas)
        self.reset()

    def reset(self) -> None:
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(budget b(step), whether to mask at this step), as peft's RankAllocator.budget_schedule."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        left = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_budget - self.target_budget) * left ** 3 + self.target_budget), step % c.deltaT == 0

    def on_step(self, model: nn.Module, optimizer, step: int) -> None:
        final = self.config.total_step - self.config.tfinal
        if step < final:
            self._update_scores()
            budget, mask_now = self.budget(step)
            if mask_now:
                self._allocate(budget)
        elif step == final:  # the final allocation, from the scores so far
            self._allocate(self.budget(step)[0])
            self.reset()
        else:
            self._apply(self.config.rank_pattern or {})

    def _update_scores(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, delta in _deltas(self.model, self.name):
                for key in ("lora_A", "lora_E", "lora_B"):
                    p = getattr(delta, key)
                    ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                    name = f"{path}.{key}"
                    avg = self.exp_avg_ipt.get(name, torch.zeros_like(p))
                    unc = self.exp_avg_unc.get(name, torch.zeros_like(p))
                    avg = b1 * avg + (1 - b1) * ipt
                    self.exp_avg_ipt[name] = avg
                    self.exp_avg_unc[name] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        """site -> S_i per triplet, (r,)."""
        def score(name: str, like: torch.Tensor) -> torch.Tensor:
            if name not in self.exp_avg_ipt:
                return torch.zeros_like(like)
            return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

        out = {}
        for path, delta in _deltas(self.model, self.name):
            s_a = score(f"{path}.lora_A", delta.lora_A).mean(dim=1)  # (r,)
            s_b = score(f"{path}.lora_B", delta.lora_B).mean(dim=0)  # (r,)
            out[path] = score(f"{path}.lora_E", delta.lora_E).view(-1) + s_a + s_b
        return out

    def _allocate(self, budget: int) -> None:
        scores = self._triplet_scores()
        k = self.init_budget - budget
        if k <= 0:
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        agree(threshold, "AdaLoRA's masking threshold")  # every process holds the same scores (DDP: same gradients)
        pattern = {f"{path}.lora_E": (~(s <= threshold)).tolist() for path, s in scores.items()}
        self._apply(pattern)
        update_config(self.model, self.name, rank_pattern=pattern)

    def _apply(self, pattern: Mapping[str, list[bool]]) -> None:
        with torch.no_grad():
            for path, delta in _deltas(self.model, self.name):
                mask = pattern.get(f"{path}.lora_E")
                if mask is not None and len(mask) == delta.lora_E.shape[0]:
                    keep = torch.tensor(mask, device=delta.lora_E.device).view(-1, 1)
                    delta.lora_E.masked_fill_(~keep, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"exp_avg_ipt": dict(self.exp_avg_ipt), "exp_avg_unc": dict(self.exp_avg_unc),
                "rank_pattern": self.config.rank_pattern, "started": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exp_avg_ipt, self.exp_avg_unc = dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])
        if state.get("rank_pattern") is not None:
            update_config(self.model, self.name, rank_pattern=state["rank_pattern"])

    @property
    def config(self) -> AdaLoraConfig:
        from ..core.model import adapter_configs

        return adapter_configs(self.model)[self.name]  # the live one: rank_pattern changes during the run


# ---- the run, the file, config updates ---------------------------------------------------------------------
def fit_run(config: AdaLoraConfig, max_steps: int) -> AdaLoraConfig:
    """total_step from max_steps (an explicit one must equal it), and the schedule checked against it."""
    if config.total_step is not None and config.total_step != max_steps:
        raise ConfigError(
            f"adapter.total_step ({config.total_step}) differs from max_steps ({max_steps}); AdaLoRA's budget schedule "
            "must end with the run: leave total_step unset (it is filled from max_steps) or set it equal")
    _check_schedule(config, max_steps, "max_steps")
    return config.replace(total_step=max_steps)


def pruned_view(model: nn.Module, adapter: Any, tensors: dict[str, torch.Tensor]) -> SavedView:
    """The file: only the triplets the rank_pattern keeps (P's columns, Λ's and Q's rows), as peft saves it."""
    config: AdaLoraConfig = adapter.config
    if not config.rank_pattern:
        return SavedView(config, tensors)
    out, kept, total = dict(tensors), 0, 0
    for path in adapter.sites:
        mask = config.rank_pattern[f"{path}.lora_E"]
        kept, total = kept + sum(mask), total + len(mask)
        if tensors[f"{path}.lora_A"].shape[0] != len(mask):
            continue  # already at its pruned size (loaded from a pruned file)
        keep = torch.tensor(mask, device=tensors[f"{path}.lora_A"].device)
        out[f"{path}.lora_A"] = tensors[f"{path}.lora_A"][keep]
        out[f"{path}.lora_E"] = tensors[f"{path}.lora_E"][keep]
        out[f"{path}.lora_B"] = tensors[f"{path}.lora_B"][:, keep]
    return SavedView(config, out, f"AdaLoRA: saved at the allocated ranks ({kept} of {total} triplets kept; "
                                  "rank_pattern in the config)")


def check_rank_pattern(model: nn.Module, adapter: Any, new: AdaLoraConfig) -> None:
    """A rank_pattern set after attach names exactly this adapter's layers and fits their live ranks."""
    pattern = new.rank_pattern or {}
    expected = {f"{path}.lora_E": delta for path, delta in adapter.deltas(model)}
    wrong = sorted(set(pattern) ^ set(expected))
    if pattern and wrong:
        raise ConfigError(f"rank_pattern must have one entry per adapted layer of {adapter.name!r} ('<module>.lora_E'); "
                          f"{wrong[0]!r} is {'not an adapted layer' if wrong[0] in pattern else 'missing'}")
    for key, mask in pattern.items():
        live = expected[key].lora_A.shape[0]
        if live not in (len(mask), sum(mask)):
            raise ConfigError(f"rank_pattern[{key!r}] keeps {sum(mask)} of {len(mask)} triplets but the layer holds {live}")


register(AdaLoraConfig, AdaLoraLinear, select=trained_biases, step_hook=RankAllocator,
         loss_term=orthogonality_penalty, fit_run=fit_run, save_view=pruned_view, check_update=check_rank_pattern,
         readers=("peft", "deltatune"))
