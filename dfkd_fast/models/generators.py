"""Image generators of the generator-based DFKD methods. Both output images in [0, 1].

* :class:`Generator` -- the CMI / FastDFKD design (Fang et al., 2021/2022): ``l1`` = Linear(nz, 2 ngf (s/4)^2),
  then ``conv_blocks`` = BN - [upsample x2 - conv3x3 - BN - LeakyReLU(0.2)] x 2 - conv3x3 - sigmoid.
* :class:`DCGANGenerator` -- the DAFL design (Chen et al., 2019) also used by ZSKT / DFQ ports: the same
  two-upsample trunk with ``BatchNorm2d(eps=0.8)`` and a tanh output, mapped affinely to [0, 1] as (t + 1) / 2.
"""
from __future__ import annotations

import torch
from torch import nn


def _check(name: str, nz: int, ngf: int, img_size: int, nc: int) -> None:
    if img_size < 4 or img_size % 4 != 0:
        raise ValueError(f"{name}: img_size must be a positive multiple of 4 (two x2 upsamplings), got {img_size}")
    for arg, v in (("nz", nz), ("ngf", ngf), ("nc", nc)):
        if v < 1:
            raise ValueError(f"{name}: {arg} must be >= 1, got {v}")


class Generator(nn.Module):
    """CMI / FastDFKD generator.

    Args:
        nz: latent size.
        ngf: base width (the trunk has 2 ngf channels).
        img_size: output height = width (multiple of 4; 32 for CIFAR, 64 for the 64x64 variant).
        nc: output channels.

    Shape:
        z: (N, nz) -> images (N, nc, img_size, img_size) in [0, 1].
    """

    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3) -> None:
        super().__init__()
        _check("Generator", nz, ngf, img_size, nc)
        self.nz, self.ngf, self.img_size, self.nc = nz, ngf, img_size, nc
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * self.init_size ** 2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"Generator: z must have shape (N, {self.nz}), got {tuple(z.shape)}")
        out = self.l1(z).view(z.shape[0], self.ngf * 2, self.init_size, self.init_size)
        return self.conv_blocks(out)

    def reinit(self, std: float = 0.02, generator: torch.Generator | None = None) -> Generator:
        """Re-initialize as CMI does for each batch: conv/linear weights ~ N(0, std), biases 0, BN weight ~ N(1, std).

        Returns ``self``.
        """
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.normal_(0.0, std, generator=generator)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.BatchNorm2d):
                    m.weight.normal_(1.0, std, generator=generator)
                    m.bias.zero_()
                    m.reset_running_stats()
        return self


class DCGANGenerator(nn.Module):
    """DAFL-style generator with a tanh output mapped to [0, 1].

    Args:
        nz: latent size (100 in DAFL).
        ngf: base width (the trunk has 2 ngf channels).
        img_size: output height = width (multiple of 4).
        nc: output channels.

    Shape:
        z: (N, nz) -> images (N, nc, img_size, img_size) in [0, 1] (``(tanh(.) + 1) / 2``).
    """

    def __init__(self, nz: int = 100, ngf: int = 64, img_size: int = 32, nc: int = 3) -> None:
        super().__init__()
        _check("DCGANGenerator", nz, ngf, img_size, nc)
        self.nz, self.ngf, self.img_size, self.nc = nz, ngf, img_size, nc
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * self.init_size ** 2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1),
            nn.BatchNorm2d(ngf * 2, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1),
            nn.BatchNorm2d(ngf, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"DCGANGenerator: z must have shape (N, {self.nz}), got {tuple(z.shape)}")
        out = self.l1(z).view(z.shape[0], self.ngf * 2, self.init_size, self.init_size)
        return (self.conv_blocks(out) + 1.0) * 0.5
