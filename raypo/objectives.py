"""What each preference objective is and needs, without its mathematics (no torch).

``OBJECTIVES`` is the one registry of objective names: the config's choices, ``raypo objectives``,
the error for an unknown name, the training step's choice of reference values and the report all
read it. The per-pair functions live in :mod:`raypo.losses` (``LOSS_FUNCTIONS``, keyed by the same
names); the formulas are in docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    """One registered objective: what it computes, what it needs and which settings it reads."""

    summary: str
    """One line for the CLI and the README."""
    uses_reference: bool
    """Its margin h is the policy/reference log-ratio margin; otherwise SimPO's length-normalised
    margin of the policy alone."""
    uses_dispersion: bool
    """Needs the reference model's dispersion weight w(x) (its normalised entropies)."""
    settings: tuple[str, ...]
    """The ``loss.*`` fields it reads."""
    learns_strength: bool = False
    """Trains a MixDPO strength distribution alongside the policy."""

    @property
    def needs_reference_model(self) -> bool:
        """Whether anything of the reference model (log-probs or entropies) reaches the loss."""
        return self.uses_reference or self.uses_dispersion


_MIXDPO_SETTINGS = (
    "beta",
    "gamma",
    "mixdpo_distribution",
    "mixdpo_estimator",
    "mixdpo_num_points",
    "mixdpo_init_cv",
    "mixdpo_learn_mean",
    "mixdpo_lr",
)

OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(
        "DPO: -log sigma(beta h), with cDPO label smoothing",
        uses_reference=True,
        uses_dispersion=False,
        settings=("beta", "gamma", "label_smoothing"),
    ),
    "ipo": Objective(
        "IPO: (h - 1/(2 beta))^2",
        uses_reference=True,
        uses_dispersion=False,
        settings=("beta", "gamma"),
    ),
    "hinge": Objective(
        "SLiC hinge: relu(1 - beta h)",
        uses_reference=True,
        uses_dispersion=False,
        settings=("beta", "gamma"),
    ),
    "simpo": Objective(
        "SimPO: reference-free, length-normalised margin, -log sigma(beta h - gamma)",
        uses_reference=False,
        uses_dispersion=False,
        settings=("beta", "gamma"),
    ),
    "mallows_theta": Objective(
        "MallowsPO-theta: DPO with the margin scaled by the dispersion w(x)",
        uses_reference=True,
        uses_dispersion=True,
        settings=("beta", "gamma", "label_smoothing", "dispersion_scale"),
    ),
    "mallows_theta_ipo": Objective(
        "MallowsPO-theta + IPO: (w(x) h - 1/(2 beta))^2",
        uses_reference=True,
        uses_dispersion=True,
        settings=("beta", "gamma", "dispersion_scale"),
    ),
    "mallows_theta_simpo": Objective(
        "MallowsPO-theta + SimPO: -log sigma(w(x) (beta h - gamma)), h length-normalised",
        uses_reference=False,
        uses_dispersion=True,
        settings=("beta", "gamma", "dispersion_scale"),
    ),
    "mallows_phi": Objective(
        "MallowsPO-phi: -log g_phi(x)(beta h), the Mallows-phi (Kendall) link",
        uses_reference=True,
        uses_dispersion=True,
        settings=("beta", "gamma", "dispersion_scale"),
    ),
    "mixdpo": Objective(
        "MixDPO: -log E_beta~D[sigma(beta h)], D a learned lognormal/gamma strength distribution",
        uses_reference=True,
        uses_dispersion=False,
        settings=_MIXDPO_SETTINGS,
        learns_strength=True,
    ),
}


def objective(name: str) -> Objective:
    """The registered objective called ``name``; a ValueError lists the valid names otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss.type {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def reference_free_objectives() -> list[str]:
    """The objectives that need nothing of the reference model."""
    return [name for name, spec in OBJECTIVES.items() if not spec.needs_reference_model]
