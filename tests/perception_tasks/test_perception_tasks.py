"""PIIP backbones in transformers' UperNet and RT-DETR: training steps, save / load, pipelines, a converted
backbone in a fresh head, the task models' cost, and the metrics the training script reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
    ResNetConfig,
    RTDetrForObjectDetection,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    pipeline,
)

from piip_llava import PIIPBackbone, PIIPPerceptionConfig
from piip_llava.cli import main
from piip_llava.flops import count_perception_cost
from piip_llava.perception_tasks import (
    backbone_of,
    detection_config,
    detection_image_processor,
    detector_from_backbone,
    segmentation_config,
    segmentation_image_processor,
    segmenter_from_backbone,
)
from piip_llava.perception_tasks.baselines import PIIPSingleBranchBackbone, single_branch_config
from piip_llava.perception_tasks.cost import format_task_cost, task_model_cost
from piip_llava.perception_tasks.metrics import coco_box_map, confusion_matrix, foreground_iou, mean_iou
from piip_llava.perception_tasks.models import ade20k_segmentation_config, stage_strides
from piip_llava.synthetic.detection import CATEGORY_NAMES, SEGMENTATION_LABELS, coco_annotations, generate_examples

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official-piip-perception"
REPO = Path(__file__).resolve().parents[2]
SEGMENTATION_ID2LABEL = dict(enumerate(SEGMENTATION_LABELS))
DETECTION_ID2LABEL = dict(enumerate(CATEGORY_NAMES))


class TaskModelTester:
    """Tiny task models on a two-branch PIIP backbone: 64 wide at 32 px and 32 wide at 64 px, patch 8."""

    image_size = 64

    def backbone_config(self) -> PIIPPerceptionConfig:
        def branch(size, width, heads):
            return {"image_size": size, "hidden_size": width, "num_hidden_layers": 2, "num_attention_heads": heads,
                    "patch_size": 8, "position_grid": size // 8, "interaction_groups": [[0, 0], [1, 1]]}  # fmt: skip

        return PIIPPerceptionConfig(branches=[branch(32, 64, 2), branch(64, 32, 1)], deform_num_heads=2)

    def segmenter(self) -> UperNetForSemanticSegmentation:
        config = segmentation_config(
            self.backbone_config(), SEGMENTATION_ID2LABEL, hidden_size=32, auxiliary_channels=16, pool_scales=[1, 2]
        )
        return UperNetForSemanticSegmentation(config)

    def detector(self) -> RTDetrForObjectDetection:
        config = detection_config(
            self.backbone_config(), DETECTION_ID2LABEL, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
            encoder_attention_heads=2, decoder_attention_heads=2, decoder_layers=2, num_queries=10, num_denoising=10,
        )  # fmt: skip
        return RTDetrForObjectDetection(config)

    def pixel_values(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size, generator=torch.Generator().manual_seed(0))

    def segmentation_labels(self, batch: int = 2) -> torch.Tensor:
        return torch.randint(0, len(SEGMENTATION_LABELS), (batch, self.image_size, self.image_size))

    def detection_labels(self, batch: int = 2) -> list[dict]:
        return [
            {"class_labels": torch.tensor([0, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]])}
            for _ in range(batch)
        ]


tester = TaskModelTester()


def activate_interactions(model) -> None:
    """Non-zero interaction gates, and random deformable offset / weight projections: at initialisation
    the interactions are the identity and the queries' norms get no gradient (their projections are zero)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in backbone_of(model).named_parameters():
            if name.endswith("_gate"):
                parameter.fill_(0.5)
            elif name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


# ----- training steps ------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_one_training_step_has_a_finite_loss_and_reaches_every_backbone_part(task):
    torch.manual_seed(0)
    model = tester.segmenter() if task == "segmentation" else tester.detector()
    activate_interactions(model)
    model.train()
    labels = tester.segmentation_labels() if task == "segmentation" else tester.detection_labels()
    loss = model(pixel_values=tester.pixel_values(), labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    backbone = backbone_of(model)
    without_gradient = [
        name for name, parameter in backbone.named_parameters()
        if parameter.grad is None or not parameter.grad.abs().sum() > 0
    ]  # fmt: skip
    # Only the 4x upsampling is unused by the detector (it takes fpn2..fpn4, as the official DINO models).
    unused = {"detection": ("upsample_4x.",), "segmentation": ()}[task]
    assert [name for name in without_gradient if not name.startswith(unused)] == []
    before = {name: parameter.detach().clone() for name, parameter in backbone.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before["piip.branches.0.patch_embedding.weight"], backbone.piip.branches[0].patch_embedding.weight)


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_task_models_keep_the_backbones_own_initialisation(task):
    """The task model's init must not overwrite PIIP's: zero gates make the interactions start as the identity."""
    model = tester.segmenter() if task == "segmentation" else tester.detector()
    gates = [parameter for name, parameter in backbone_of(model).named_parameters() if name.endswith("_gate")]
    assert gates and all(torch.count_nonzero(gate) == 0 for gate in gates)
    assert torch.equal(backbone_of(model).merge_weights.weights, torch.ones(2))


def test_detection_takes_fpn2_to_fpn4_with_their_strides():
    config = tester.detector().config
    assert config.backbone_config.out_features == ["fpn2", "fpn3", "fpn4"]
    assert list(config.feat_strides) == [4, 8, 16] == stage_strides(config.backbone_config)
    assert list(config.encoder_in_channels) == [64, 64, 64]


# ----- saving, loading, pipelines ------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_save_load_round_trip_gives_equal_outputs(task, tmp_path):
    torch.manual_seed(0)
    model = (tester.segmenter() if task == "segmentation" else tester.detector()).eval()
    activate_interactions(model)
    model.save_pretrained(tmp_path)
    auto_class = AutoModelForSemanticSegmentation if task == "segmentation" else AutoModelForObjectDetection
    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and isinstance(backbone_of(loaded), PIIPBackbone)
    pixel_values = tester.pixel_values()
    with torch.no_grad():
        expected, actual = model(pixel_values=pixel_values), loaded(pixel_values=pixel_values)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-6)
    if task == "detection":
        torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, rtol=1e-5, atol=1e-6)


def shapes_image(size: int = 64) -> Image.Image:
    return generate_examples(1, "eval", seed=3, image_size=size)[0].image


def test_image_segmentation_pipeline_on_a_saved_directory(tmp_path):
    model = tester.segmenter()
    model.save_pretrained(tmp_path)
    segmentation_image_processor(model.config.backbone_config).save_pretrained(tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    image = shapes_image(80)  # any size: the processor resizes, the masks come back at the image's size
    segments = segmenter(image, subtask="semantic")
    assert segments and {segment["label"] for segment in segments} <= set(SEGMENTATION_LABELS)
    masks = [np.asarray(segment["mask"]) > 0 for segment in segments]
    assert all(mask.shape == (80, 80) for mask in masks)
    assert np.array_equal(np.sum(masks, axis=0), np.ones((80, 80)))  # every pixel gets exactly one class


def test_object_detection_pipeline_on_a_saved_directory(tmp_path):
    model = tester.detector()
    model.save_pretrained(tmp_path)
    detection_image_processor(model.config.backbone_config).save_pretrained(tmp_path)
    detector = pipeline("object-detection", model=str(tmp_path))
    detections = detector(shapes_image(80), threshold=0.0)
    assert len(detections) == model.config.num_queries
    for detection in detections:
        assert detection["label"] in CATEGORY_NAMES and 0 <= detection["score"] <= 1
        box = detection["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= 80 and 0 <= box["ymin"] <= box["ymax"] <= 80


# ----- a converted official backbone in a fresh head ---------------------------------------------------------
def test_task_models_load_a_converted_official_backbone_with_a_fresh_head(tmp_path):
    converted = tmp_path / "converted"
    assert main(["convert", "--src", str(FIXTURES / "det_3branch_backbone"), "--dst", str(converted)]) == 0
    reference = PIIPBackbone.from_pretrained(converted).eval()
    segmenter = segmenter_from_backbone(converted, SEGMENTATION_ID2LABEL, hidden_size=32, auxiliary_channels=16)
    detector = detector_from_backbone(converted, DETECTION_ID2LABEL, d_model=32, decoder_layers=1, num_queries=5)
    for model in (segmenter, detector):
        loaded = backbone_of(model.eval()).state_dict()
        assert all(torch.equal(loaded[name], value) for name, value in reference.state_dict().items())
    pixel_values = torch.randn(1, 3, 160, 80)
    with torch.no_grad():
        expected = reference(pixel_values).feature_maps
        segmenter_maps = backbone_of(segmenter)(pixel_values).feature_maps
        detector_maps = backbone_of(detector)(pixel_values).feature_maps
        logits = segmenter(pixel_values=pixel_values).logits
    for actual, wanted in zip(segmenter_maps, expected):
        torch.testing.assert_close(actual, wanted)
    for actual, wanted in zip(detector_maps, expected[1:]):  # fpn2..fpn4
        torch.testing.assert_close(actual, wanted)
    assert logits.shape == (1, len(SEGMENTATION_LABELS), 160, 80)
    segmenter.save_pretrained(tmp_path / "segmenter")
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "segmenter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixel_values).logits, logits, rtol=1e-5, atol=1e-6)


def test_released_ade20k_backbone_gives_a_150_class_upernet():
    backbone = PIIPPerceptionConfig.from_json_file(
        REPO / "configs" / "perception" / "upernet_internvit_h6b_192_512_80k_ade20k_bs16_lr4e-5.json"
    )
    config = ade20k_segmentation_config(backbone)
    assert config.num_labels == 150 and config.backbone_config.out_features == ["fpn1", "fpn2", "fpn3", "fpn4"]
    assert config.hidden_size == 512 and config.auxiliary_channels == 256


# ----- cost -------------------------------------------------------------------------------------------------
def test_backbone_share_counts_the_backbone_as_the_perception_counter_does():
    model = tester.segmenter()
    cost = task_model_cost(model.config)
    backbone_cost = count_perception_cost(model.config.backbone_config)
    backbone_macs = backbone_cost.macs + sum(part.macs for part in backbone_cost.outside_total)
    assert cost["backbone_macs"] == backbone_macs
    assert cost["backbone_parameters"] == sum(parameter.numel() for parameter in backbone_of(model).parameters())
    assert cost["parameters"] == sum(parameter.numel() for parameter in model.parameters())
    assert 0 < cost["backbone_macs_share"] < 1
    assert cost["backbone_macs_share"] == pytest.approx(cost["backbone_macs"] / cost["macs"])


def test_flops_command_reports_the_backbones_share_of_a_saved_task_model(tmp_path, capsys):
    model = tester.detector()
    model.save_pretrained(tmp_path)
    assert main(["flops", str(tmp_path), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    expected = task_model_cost(model.config)
    assert reported["backbone_macs_share"] == pytest.approx(expected["backbone_macs_share"])
    assert reported["backbone_gflops"] < reported["gflops"]
    table = format_task_cost(expected, title="detector").splitlines()
    assert table[3].split()[:4] == ["backbone", f"{expected['backbone_parameters'] / 1e6:.2f}",
                                    f"{expected['backbone_gflops']:.3f}", f"{100 * expected['backbone_macs_share']:.1f}%"]


def test_flops_command_refuses_a_task_model_without_a_piip_backbone(tmp_path, capsys):
    UperNetConfig(backbone_config=ResNetConfig(out_features=["stage1", "stage2"])).save_pretrained(tmp_path)
    assert main(["flops", str(tmp_path)]) == 2
    assert "ResNetConfig backbone, not a PIIP one" in capsys.readouterr().err


# ----- metrics ----------------------------------------------------------------------------------------------
def test_mean_iou_over_classes_present():
    references = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    predictions = np.array([[0, 1, 1, 1], [0, 0, 1, 2]])
    scores = mean_iou(confusion_matrix(predictions, references, num_labels=4))
    # class 0: 3 / 4; class 1: 3 / 5; class 2: 0 / 1; class 3 absent from both (no IoU)
    assert scores["per_class_iou"] == [0.75, 0.6, 0.0, None]
    assert scores["mean_iou"] == pytest.approx((0.75 + 0.6 + 0.0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(6 / 8)
    # foreground (classes 1..3 as one): reference 4 pixels, predicted 5, both 4
    assert foreground_iou(confusion_matrix(predictions, references, num_labels=4)) == pytest.approx(4 / 5)


def test_coco_map_is_one_for_the_ground_truth_and_drops_for_a_shifted_box():
    examples = generate_examples(4, "eval", seed=1)
    ground_truth = coco_annotations(examples)
    perfect = [
        {"image_id": item["image_id"], "category_id": item["category_id"], "bbox": item["bbox"], "score": 1.0}
        for item in ground_truth["annotations"]
    ]
    assert coco_box_map(ground_truth, perfect)["map"] == pytest.approx(1.0)
    shifted = [dict(item, bbox=[item["bbox"][0] + item["bbox"][2], *item["bbox"][1:]]) for item in perfect]
    assert coco_box_map(ground_truth, shifted)["map"] == pytest.approx(0.0)
    relabelled = [dict(item, category_id=(item["category_id"] + 1) % len(CATEGORY_NAMES)) for item in perfect]
    assert coco_box_map(ground_truth, relabelled)["map"] == pytest.approx(0.0)
    assert coco_box_map(ground_truth, relabelled, class_agnostic=True)["map"] == pytest.approx(1.0)
    assert coco_box_map(ground_truth, [])["map"] == 0.0


# ----- single-branch baselines ------------------------------------------------------------------------------
@pytest.mark.parametrize("branch_index", [0, 1])
def test_a_single_branch_computes_what_that_branch_computes_inside_a_pyramid_without_interactions(branch_index):
    """Zero gates (the initial state) make the interactions the identity, so the pyramid's branch must then
    equal the branch run alone on the image the pyramid gives it."""
    torch.manual_seed(0)
    pyramid = PIIPBackbone(tester.backbone_config()).eval()
    single = PIIPSingleBranchBackbone(single_branch_config(tester.backbone_config(), branch_index)).eval()
    single.vit.load_state_dict(pyramid.piip.branches[branch_index].state_dict())
    pixel_values = tester.pixel_values()
    with torch.no_grad():
        expected = pyramid.piip(pixel_values).feature_maps[branch_index]
        state = single.vit.embed(F.interpolate(pixel_values, scale_factor=0.5, mode="bilinear")
                                 if branch_index == 0 else pixel_values, branch_index + 1)  # fmt: skip
        actual = single.vit.run_blocks(state, 0, 1).feature_map()
        maps = single(pixel_values).feature_maps
    torch.testing.assert_close(actual, expected)
    grid = tester.backbone_config().branches[branch_index]["image_size"] // 8
    assert [tuple(feature_map.shape[-2:]) for feature_map in maps] == [(4 * grid,) * 2, (2 * grid,) * 2, (grid,) * 2,
                                                                      (grid // 2,) * 2]  # fmt: skip


def test_single_branch_segmenter_trains_and_counts_less_than_the_pyramid():
    backbone = single_branch_config(tester.backbone_config(), 0)
    model = UperNetForSemanticSegmentation(segmentation_config(backbone, SEGMENTATION_ID2LABEL, hidden_size=32,
                                                               auxiliary_channels=16, pool_scales=[1, 2]))  # fmt: skip
    assert isinstance(model.backbone, PIIPSingleBranchBackbone)
    loss = model(pixel_values=tester.pixel_values(), labels=tester.segmentation_labels()).loss
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.vit.patch_embedding.weight.grad.abs().sum() > 0
    assert task_model_cost(model.config)["backbone_macs"] < task_model_cost(tester.segmenter().config)["backbone_macs"]
    with pytest.raises(ValueError, match="branch_index 2 is not a branch index"):
        single_branch_config(tester.backbone_config(), 2)
