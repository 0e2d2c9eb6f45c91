"""Privacy accounting for DP-SGD: composes Poisson-subsampled Gaussian steps with an Opacus
accountant chosen by name, reports ε for a δ, calibrates σ for a target ε and checks δ."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.fft
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import Domain, PoissonSubsampledGaussianPRV

from tensafe.errors import ConfigError, UserError

Step = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)

# Opacus' default orders stop at 63, where the optimum sits for small ε; the orders of
# dp_accounting's RdpAccountant add 128..1024. Any set of orders gives a valid bound.
RDP_ORDERS: tuple[float, ...] = (*RDPAccountant.DEFAULT_ALPHAS, 128, 256, 512, 1024)

# PRV reports estimate + eps_error, so eps_error is the price of the guarantee: it is aimed at
# 0.2% of ε, which keeps PRV within ~0.5% of PLD. The grid it needs is shared by the distinct
# (σ, q) entries of a history (each is discretized and transformed on the full grid) and capped
# so that a call stays under ~1 s for 10,000 steps; a capped grid only coarsens the mesh, so the
# bound stays valid, just looser. Past the soft cap a grid may grow to the hard cap rather than
# let eps_error exceed 0.5: Opacus argues its safe-domain rule only for eps_error < 1
# (the FIXME in opacus/accountants/analysis/prv/domain.py).
_PRV_RELATIVE_ERROR = 0.002
_PRV_GRID_POINTS = 2**21
_PRV_MAX_GRID_POINTS = 2**23
_PRV_MAX_EPS_ERROR = 0.5
_PRV_PROBE_EPS_ERROR = 0.01

MAX_NOISE_MULTIPLIER = 1e4
MIN_NOISE_MULTIPLIER = 0.01


class AccountingError(UserError):
    """An accountant state that cannot be used (corrupt or inconsistent history)."""


class RdpBackend(RDPAccountant):
    """Rényi-DP accounting (Mironov 2017; Opacus): a valid upper bound, loose for small ε."""

    def epsilon(self, delta: float) -> float:
        return float(self.get_epsilon(delta, alphas=list(RDP_ORDERS)))


class PrvBackend(PRVAccountant):
    """Numerical composition of privacy loss random variables (Gopi et al. 2021; Opacus):
    tight, reported as an upper bound (estimate + eps_error)."""

    def epsilon(self, delta: float) -> float:
        delta_error = delta / 1000  # Opacus' default; keeps the δ slack negligible
        # The grid size is proportional to 1/eps_error, so one probe prices every eps_error.
        cost = _PRV_PROBE_EPS_ERROR * self._grid_size(_PRV_PROBE_EPS_ERROR, delta_error)
        cost *= len(self.history)
        if cost / _PRV_MAX_GRID_POINTS > _PRV_MAX_EPS_ERROR:
            raise _prv_failure(
                self.history,
                delta,
                f"its grid would exceed {_PRV_MAX_GRID_POINTS} points at an ε error of {_PRV_MAX_EPS_ERROR}",
            )
        finest = cost / _PRV_GRID_POINTS
        rdp = RdpBackend()
        rdp.history = list(self.history)
        eps_error = min(max(finest, _PRV_RELATIVE_ERROR * rdp.epsilon(delta)), _PRV_MAX_EPS_ERROR)
        eps = self._upper_bound(delta, eps_error, delta_error)
        # RDP can overstate a small ε many times over; aim again, at PRV's own estimate.
        refined = max(finest, _PRV_RELATIVE_ERROR * (eps - eps_error))
        if refined < eps_error / 2:
            eps = self._upper_bound(delta, refined, delta_error)
        return eps

    def _upper_bound(self, delta: float, eps_error: float, delta_error: float) -> float:
        try:
            eps = float(self.get_epsilon(delta, eps_error=eps_error, delta_error=delta_error))
        except (RuntimeError, ValueError, ArithmeticError) as err:
            why = f"Opacus PRV failed: {str(err).rstrip('.')}"
            raise _prv_failure(self.history, delta, why) from err
        if not math.isfinite(eps) or eps < 0:
            raise _prv_failure(self.history, delta, f"Opacus PRV returned ε={eps}")
        return eps

    def _grid_size(self, eps_error: float, delta_error: float) -> int:
        prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in self.history]
        counts = [n for _, _, n in self.history]
        return self._get_domain(
            prvs=prvs, num_self_compositions=counts, eps_error=eps_error, delta_error=delta_error
        ).size

    def _get_domain(self, **kwargs: Any) -> Domain:
        # Opacus' grid sizes often have large prime factors, where pocketfft falls back to
        # Bluestein (3-10x slower). Growing the grid to a fast length keeps the mesh and only
        # widens the truncation domain, which never loosens the error bound. The domain stays
        # [-k·dt, (k+1)·dt] because the FFT self-composition assumes that layout.
        domain = super()._get_domain(**kwargs)
        size = scipy.fft.next_fast_len(domain.size, real=True)
        while size % 2:
            size = scipy.fft.next_fast_len(size + 1, real=True)
        k = size // 2 - 1
        return Domain(t_min=-k * domain.dt, t_max=(k + 1) * domain.dt, size=size)


def _prv_failure(history: Sequence[Step], delta: float, why: str) -> ConfigError:
    return ConfigError(
        "privacy.accountant",
        "prv",
        f"cannot account for history (σ, q, steps)={list(history)} at δ={delta:g}: {why}; "
        "use privacy.accountant=rdp (a valid, looser bound)",
    )


ACCOUNTANTS: dict[str, Callable[[], RdpBackend | PrvBackend]] = {
    "rdp": RdpBackend,
    "prv": PrvBackend,
}


def _backend(name: str) -> Callable[[], RdpBackend | PrvBackend]:
    try:
        return ACCOUNTANTS[name]
    except KeyError:
        raise ConfigError("privacy.accountant", name, f"one of {sorted(ACCOUNTANTS)}") from None


def _epsilon(name: str, history: Sequence[Step], delta: float) -> float:
    _check_delta_range(delta)
    if not history:
        return 0.0
    backend = _backend(name)()
    backend.history = [tuple(entry) for entry in history]
    # At q = 1 (the training service's client batches) Opacus' PRV takes log(1 - q) = -inf in a
    # branch that np.where then discards: the value is right, the warning is noise.
    with np.errstate(divide="ignore"):
        return backend.epsilon(delta)


def _check_step(noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError(
            "privacy.noise_multiplier",
            noise_multiplier,
            "must be a finite number > 0 (σ = 0 gives no differential privacy)",
        )
    _check_sample_rate(sample_rate)
    _check_steps(num_steps)


def _check_sample_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ConfigError("sample_rate", sample_rate, "must be in (0, 1] (expected batch / N)")


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ConfigError("steps", num_steps, "must be an integer >= 0")


def _check_delta_range(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError("privacy.delta", delta, "must be in (0, 1)")


class StepHistory:
    """The (σ, q, steps) entries of a run's noisy steps, merged where (σ, q) repeat."""

    def __init__(self) -> None:
        self._history: list[Step] = []

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record `num_steps` Poisson-sampled steps at noise multiplier σ and rate q."""
        _check_step(noise_multiplier, sample_rate, num_steps)
        self._history = _appended(self._history, noise_multiplier, sample_rate, num_steps)

    @property
    def history(self) -> list[Step]:
        return list(self._history)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._history)

    def _load_history(self, entries: Sequence[Any]) -> None:
        """Replace the history with saved [σ, q, steps] entries, each checked."""
        history: list[Step] = []
        for sigma, q, n in entries:
            try:
                _check_step(sigma, q, n)
            except ConfigError as err:
                raise AccountingError(f"accountant state has an invalid entry: {err}") from None
            history = _appended(history, sigma, q, n)
        self._history = history


class PrivacyAccountant(StepHistory):
    """The composition of every DP-SGD step of a run, by one accountant (see ACCOUNTANTS).

    The history is accountant-independent (σ, q, steps), so a run resumed under another
    accountant still continues it rather than restarting at zero.
    """

    def __init__(self, name: str):
        _backend(name)
        super().__init__()
        self.name = name

    def epsilon(self, delta: float) -> float:
        """ε spent so far at this δ; 0 before the first step."""
        return _epsilon(self.name, self._history, delta)

    def epsilon_if(
        self, noise_multiplier: float, sample_rate: float, extra_steps: int, delta: float
    ) -> float:
        """ε this accountant would report after `extra_steps` more steps; changes nothing."""
        _check_step(noise_multiplier, sample_rate, extra_steps)
        future = _appended(self._history, noise_multiplier, sample_rate, extra_steps)
        return _epsilon(self.name, future, delta)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: the accountant's name and the merged history."""
        return {"accountant": self.name, "history": [list(entry) for entry in self._history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with a saved one (from any accountant; see the class docstring)."""
        try:
            entries = [(float(s), float(q), n) for s, q, n in state["history"]]
        except (KeyError, TypeError, ValueError) as err:
            raise AccountingError(
                f"accountant state must hold 'history' as [noise_multiplier, sample_rate, steps] "
                f"triples; got {state!r} ({err})"
            ) from None
        self._load_history(entries)


def _appended(history: list[Step], sigma: float, q: float, n: int) -> list[Step]:
    """`history` plus n steps at (σ, q), merged into the last entry when (σ, q) repeat."""
    if n == 0:
        return list(history)
    if history and history[-1][:2] == (sigma, q):
        return [*history[:-1], (history[-1][0], history[-1][1], history[-1][2] + int(n))]
    return [*history, (float(sigma), float(q), int(n))]


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    epsilon_tolerance: float = 0.01,
    history: Sequence[Step] = (),
) -> float:
    """The smallest σ (to within min(epsilon_tolerance, 1% of the target) in ε) for which
    `accountant` reports ε <= target_epsilon after `history` (steps already taken, e.g. by the
    run being resumed) followed by `steps` steps at `sample_rate`.

    Guarantee: the returned σ is one at which the accountant's ε was computed and found
    <= target_epsilon; the search never returns an unevaluated or failing σ.
    """
    _backend(accountant)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError("privacy.target_epsilon", target_epsilon, "must be a finite number > 0")
    _check_delta_range(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    if steps == 0:
        raise ConfigError("steps", steps, "calibration needs at least one training step")
    tolerance = min(epsilon_tolerance, 0.01 * target_epsilon)
    prefix: list[Step] = [(float(s), float(q), int(n)) for s, q, n in history]
    if prefix and (spent := _epsilon(accountant, prefix, delta)) >= target_epsilon:
        raise ConfigError(
            "privacy.target_epsilon",
            target_epsilon,
            f"already spent: the resumed history reaches ε={spent:.4g}; raise the target or stop here",
        )

    def eps_at(name: str) -> Callable[[float], float]:
        return lambda sigma: _epsilon(name, [*prefix, (sigma, sample_rate, steps)], delta)

    # RDP is cheap and never tighter than PRV, so its σ brackets any accountant's from above.
    try:
        hint = smallest_sigma(eps_at("rdp"), target_epsilon, tolerance, 1.0, sample_rate, steps, delta)
        return smallest_sigma(eps_at(accountant), target_epsilon, tolerance, hint, sample_rate, steps, delta)
    except ConfigError as err:
        if not prefix:
            raise
        raise ConfigError(
            "privacy.target_epsilon",
            target_epsilon,
            f"{err.allowed}; the resumed history has already spent "
            f"ε={_epsilon(accountant, prefix, delta):.4g} of it",
        ) from None


def smallest_sigma(
    eps: Callable[[float], float],
    target: float,
    tolerance: float,
    hint: float,
    sample_rate: float,
    steps: int,
    delta: float,
) -> float:
    """Bracket then bisect (in log σ) for the smallest σ with eps(σ) <= target."""
    setting = f"q={sample_rate:g}, steps={steps}, δ={delta:g}"
    hi, eps_hi = hint, eps(hint)
    lo = None
    while eps_hi > target:
        lo, hi = hi, 2 * hi
        if hi > MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                "privacy.target_epsilon",
                target,
                f"unreachable: needs noise_multiplier > {MAX_NOISE_MULTIPLIER:g} at {setting}; "
                "raise the target, train fewer steps or use a smaller batch",
            )
        eps_hi = eps(hi)
    if target - eps_hi <= tolerance:
        return hi
    if lo is None:
        lo, eps_lo = hi / 2, eps(hi / 2)
        while eps_lo <= target:
            hi, eps_hi, lo = lo, eps_lo, lo / 2
            if lo < MIN_NOISE_MULTIPLIER:
                raise ConfigError(
                    "privacy.target_epsilon",
                    target,
                    f"is met even with noise_multiplier < {MIN_NOISE_MULTIPLIER:g} at {setting}: "
                    "such a target promises no meaningful privacy; lower it",
                )
            eps_lo = eps(lo)
    # Invariant: eps(lo) > target >= eps(hi) = eps_hi; hi is only ever set to a σ so measured.
    while target - eps_hi > tolerance and hi / lo > 1 + 1e-6:
        mid = math.sqrt(lo * hi)
        eps_mid = eps(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi


def default_delta(dataset_size: int) -> float:
    """δ = 1/(10·N): well below the 1/N at which releasing one random record would satisfy DP."""
    _check_dataset_size(dataset_size)
    return 1.0 / (10 * dataset_size)


def check_delta(delta: float, dataset_size: int) -> None:
    """Refuse δ >= 1/N: such a δ allows a mechanism that publishes a whole record."""
    _check_dataset_size(dataset_size)
    _check_delta_range(delta)
    if delta >= 1.0 / dataset_size:
        raise ConfigError(
            "privacy.delta",
            delta,
            f"must be < 1/N = {1.0 / dataset_size:.3g} for N={dataset_size} training records",
        )


def _check_dataset_size(dataset_size: int) -> None:
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, (int, np.integer)) or dataset_size < 1:
        raise ConfigError("dataset_size", dataset_size, "must be an integer >= 1")
