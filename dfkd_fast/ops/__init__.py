"""Fused hot-path ops (SPEC §2-§3). Every op takes ``backend="auto"|"triton"|"cpp"|"torch"``."""
from dfkd_fast.ops.bn_stats import bn_stat_loss, bn_stat_loss_from_stats, bn_stats, channel_stats
from dfkd_fast.ops.crop_flip import crop_flip
from dfkd_fast.ops.dirichlet import beta_mixture, class_similarity, dirichlet_targets
from dfkd_fast.ops.info_nce import info_nce
from dfkd_fast.ops.soft_ce import kd_kl_div, soft_target_cross_entropy

__all__ = ["bn_stats", "bn_stat_loss", "channel_stats", "bn_stat_loss_from_stats",
           "soft_target_cross_entropy", "kd_kl_div", "info_nce", "crop_flip",
           "class_similarity", "dirichlet_targets", "beta_mixture"]
