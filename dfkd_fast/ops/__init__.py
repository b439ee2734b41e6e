"""Fused hot-path ops (SPEC §2-§3). Every op takes ``backend="auto"|"triton"|"cpp"|"torch"``."""
from dfkd_fast.ops.bn_stats import bn_stat_loss, bn_stat_loss_from_stats, bn_stats, channel_stats
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
