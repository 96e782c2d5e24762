"""Constants and type aliases the parts of the reproduction share."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
# A difference counts when it exceeds two standard errors (about 95% two-sided).
Z = 2.0
# The collapse counts as early when the softmax has collapsed over the second half of the path
# at the latest: then cfm's target x1 - x0 equals û* on most of [0, 1].
EARLY_COLLAPSE = 0.5
# The final training loss is the mean of the batch losses logged over the last 10% of steps.
LOSS_TAIL = 0.1
MEMORIZATION_THRESHOLD = 1 / 3
MARKER = "reproduce.json"
PAPER = ("Bertrand, Gagneux, Massias, Emonet, *On the Closed-Form of Flow Matching: "
         "Generalization Does Not Arise from Target Stochasticity* (arXiv:2506.03719)")
COLORS = {"cfm": "tab:blue", "knn-efm": "tab:red"}
EFM_COLORS = ("tab:orange", "tab:green")
