"""The student of Reverse Distillation (Deng & Li, CVPR 2022), built from the teacher's stages.

For a WideResNet50 teacher at 256 px this is exactly RD's network: the one-class bottleneck
embedding (OCBE) maps 256@64, 512@32 and 1024@16 to 2048@8 through three residual blocks of
inner width 1024, and the decoder mirrors the teacher with [3, 4, 6] blocks and transposed-conv
upsampling to 1024@16, 512@32 and 256@64. Other backbones get the same structure with their
own channel counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class EncoderBottleneckBlock(nn.Module):
    """ResNet bottleneck block (1x1, strided 3x3, 1x1) with a projection shortcut if needed."""

    def __init__(self, in_ch: int, out_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(in_ch, width, 1, 1),
            *_conv_bn_relu(width, width, 3, stride),
            nn.Conv2d(width, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class DecoderBottleneckBlock(nn.Module):
    """RD's de-bottleneck: the strided 3x3 becomes a 2x2 transposed conv that doubles H and W."""

    def __init__(self, in_ch: int, out_ch: int, width: int, upsample: bool = False) -> None:
        super().__init__()
        middle = (
            nn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
            if upsample
            else nn.Conv2d(width, width, 3, padding=1, bias=False)
        )
        self.body = nn.Sequential(
            *_conv_bn_relu(in_ch, width, 1, 1),
            middle,
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut: nn.Module = nn.Identity()
        if upsample or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2, bias=False)
                if upsample
                else nn.Conv2d(in_ch, out_ch, 1, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class OneClassBottleneck(nn.Module):
    """OCBE: fuse teacher stages 1-3 into one compact stage-4-shaped embedding."""

    def __init__(self, channels: Sequence[int], blocks: int, width_ratio: float) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        # Stage 1 and stage 2 are strided down to stage-3 resolution (RD's conv1-3).
        self.from_stage1 = nn.Sequential(*_conv_bn_relu(c1, c2, 3, 2), *_conv_bn_relu(c2, c3, 3, 2))
        self.from_stage2 = nn.Sequential(*_conv_bn_relu(c2, c3, 3, 2))
        width = int(c4 * width_ratio)
        self.blocks = nn.Sequential(
            EncoderBottleneckBlock(3 * c3, c4, width, stride=2),
            *(EncoderBottleneckBlock(c4, c4, width) for _ in range(blocks - 1)),
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = features[:3]
        fused = torch.cat([self.from_stage1(f1), self.from_stage2(f2), f3], dim=1)
        return self.blocks(fused)


def make_decoder_stage(in_ch: int, out_ch: int, blocks: int, width_ratio: float) -> nn.Sequential:
    """One decoder stage: the first block upsamples x2 and maps in_ch to out_ch."""
    width = int(out_ch * width_ratio)
    return nn.Sequential(
        DecoderBottleneckBlock(in_ch, out_ch, width, upsample=True),
        *(DecoderBottleneckBlock(out_ch, out_ch, width) for _ in range(blocks - 1)),
    )


class ReverseDistillationStudent(nn.Module):
    """OCBE plus a decoder whose stages produce teacher stages 3, 2, 1 (deepest first).

    `doubled_inputs[k]` widens the first block of decoder stage k to 2C input channels, where
    an NR Memory concatenates its recalled feature to the query (MemKD Fig. 3).
    """

    def __init__(
        self,
        teacher_channels: Sequence[int],
        bottleneck_blocks: int = 3,
        decoder_blocks: Sequence[int] = (3, 4, 6),
        width_ratio: float = 0.5,
        doubled_inputs: Sequence[bool] = (False, False, False),
    ) -> None:
        super().__init__()
        c1, c2, c3, c4 = teacher_channels
        self.bottleneck = OneClassBottleneck(teacher_channels, bottleneck_blocks, width_ratio)
        stage_io = [(c4, c3), (c3, c2), (c2, c1)]
        self.decoder = nn.ModuleList(
            make_decoder_stage(cin * (2 if doubled else 1), cout, blocks, width_ratio)
            for (cin, cout), blocks, doubled in zip(
                stage_io, decoder_blocks, doubled_inputs, strict=True
            )
        )
        self.stage_input_channels = [cin for cin, _ in stage_io]
        _init_like_torchvision_resnet(self)


def _init_like_torchvision_resnet(module: nn.Module) -> None:
    # RD builds its student from torchvision's ResNet code and keeps that initialisation.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
