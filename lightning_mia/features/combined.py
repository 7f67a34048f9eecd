"""Attack IV of Wu et al., `combined`: the features of attacks I, II and III together (it has
no feature group of its own)."""

from lightning_mia.specs.attacks import AttackSpec, register_attack

register_attack(
    AttackSpec(
        "combined",
        ("pixel", "semantic", "text", "quality"),
        "black-box",
        "attack IV: the features of attacks I, II and III together",
        paper=4,
    )
)
