"""Fused hot-path ops (SPEC §2-§3). Every op takes ``backend="auto"|"triton"|"cpp"|"torch"``.

The fused paths are ``torch.library.custom_op`` s in the ``dfkd_fast`` namespace (fake implementation +
autograd), so ``torch.compile(fullgraph=True)`` traces every op; value checks are device flags inside
:func:`dfkd_fast._checks.deferred` (no host sync per call). Helpers of the BN-prior loss that are not ops
(``StatConstants``, ``pack_stat_constants``, ``pack_momentum``, ``bn_stat_loss_packed``) are importable from
here too but are not listed in ``__all__`` / ``OP_BACKENDS``.
"""
from dfkd_fast.ops.bn_stats import (  # noqa: F401 (helpers re-exported beside the ops)
    StatConstants,
    bn_stat_loss,
    bn_stat_loss_from_stats,
    bn_stat_loss_packed,
    bn_stats,
    channel_stats,
    pack_momentum,
    pack_stat_constants,
)
from dfkd_fast.ops.crop_flip import crop_flip
from dfkd_fast.ops.dirichlet import beta_mixture, class_similarity, dirichlet_targets
from dfkd_fast.ops.info_nce import info_nce
from dfkd_fast.ops.soft_ce import kd_kl_div, soft_target_cross_entropy

__all__ = ["bn_stats", "bn_stat_loss", "channel_stats", "bn_stat_loss_from_stats",
           "soft_target_cross_entropy", "kd_kl_div", "info_nce", "crop_flip",
           "class_similarity", "dirichlet_targets", "beta_mixture"]

#: Implementations behind each public op: whether it has Triton kernels, and the ``dfkd_fast._C`` function
#: that the cpp backend needs (``None``: no cpp implementation). ``dfkd-fast info`` reports from this table.
OP_BACKENDS: dict[str, tuple[bool, str | None]] = {
    "bn_stats": (True, "bn_stats_fwd"),
    "channel_stats": (True, "bn_stats_fwd"),
    "bn_stat_loss": (True, "bn_stats_fwd"),
    "bn_stat_loss_from_stats": (True, "bn_stat_loss_terms"),
    "soft_target_cross_entropy": (True, "soft_ce_fwd"),
    "kd_kl_div": (True, "kd_kl_fwd"),
    "info_nce": (True, None),
    "crop_flip": (True, "crop_flip_fwd"),
    "class_similarity": (True, None),
    "dirichlet_targets": (False, None),
    "beta_mixture": (False, None),
}
