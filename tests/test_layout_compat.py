"""Files written before the package was rearranged keep working: a plans file and an encoder weights file
made by the code of commit 8f48000 (tests/fixtures/before_layout, see its make_fixture.py) are read by
today's code, which builds the network the plan names, loads the encoder into it and trains a step."""

import json
from pathlib import Path

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from pumit_seg.models.vit import UniversalViT, load_pretrained_encoder
from pumit_seg.trainers.pumit_trainer import PUMITTrainer
from pumit_seg.weights import load_model, read_header

FIXTURE = Path(__file__).parent / "fixtures" / "before_layout"


def test_weights_header_names_a_class_that_still_loads():
    header = read_header(FIXTURE / "encoder.safetensors")
    assert header["class"] == "pumit_seg.models.vit.UniversalViT"
    model = load_model(FIXTURE / "encoder.safetensors")
    assert isinstance(model, UniversalViT) and model.config["depth"] == 4


def test_plan_builds_the_network_which_takes_the_encoder_and_trains(one_torch_thread):
    plans = json.loads((FIXTURE / "PUMITPlans.json").read_text())
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration("3d_fullres")
    assert configuration.network_arch_class_name == "pumit_seg.models.seg_net.PUMITSegNet"
    labels = json.loads((FIXTURE / "dataset.json").read_text())["labels"]
    network = PUMITTrainer.build_network_architecture(plans_manager, configuration, 1, len(labels), True)

    report = load_pretrained_encoder(network.encoder, FIXTURE / "encoder.safetensors")
    assert not report.missing, report.summary()
    saved = load_model(FIXTURE / "encoder.safetensors").state_dict()
    torch.testing.assert_close(
        network.encoder.blocks[0].attn.q_proj.weight, saved["blocks.0.attn.q_proj.weight"]
    )

    torch.manual_seed(0)
    x = torch.randn(1, 1, *configuration.patch_size)
    target = torch.randint(0, len(labels), (1, *configuration.patch_size))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in network.parameters()]
    outputs = network(x)
    loss = torch.nn.functional.cross_entropy(outputs[0], target)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(
        not torch.equal(b, p) for b, p in zip(before, network.parameters(), strict=True) if p.grad is not None
    )
