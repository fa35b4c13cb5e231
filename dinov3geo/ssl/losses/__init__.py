"""DINOv3 SSL losses (DINO CLS, iBOT patch, KoLeo, Gram), mirroring the official ``dinov3/loss/``."""

from dinov3geo.ssl.losses.dino_clstoken_loss import DINOLoss
from dinov3geo.ssl.losses.gram_loss import GramLoss
from dinov3geo.ssl.losses.ibot_patch_loss import SinkhornKnoppTeacher, iBOTPatchLoss
from dinov3geo.ssl.losses.koleo_loss import KoLeoLoss, KoLeoLossDistributed

__all__ = [
    "DINOLoss",
    "GramLoss",
    "KoLeoLoss",
    "KoLeoLossDistributed",
    "SinkhornKnoppTeacher",
    "iBOTPatchLoss",
]
