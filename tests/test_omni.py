"""SMAR with more than two modalities on a model: the regularizer reduces exactly to the
two-modality one, and a tiny Qwen3-Omni-MoE thinker with text, image, video and audio in every
batch is held in its bands (docs/method.md#more-than-two-modalities)."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import smar
import smar.hf

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import families  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from omni_thinker import AUD, IMG, VID, tiny_thinker  # noqa: E402
from omni_thinker import batch as omni_batch  # noqa: E402

TEXT_PAIRS = ("text-image", "text-video", "text-audio")


def omni_thinker(seed=0):
    """The example's tiny Qwen3-Omni-MoE thinker (2 layers, hidden 32, 4 experts, top-2) whose
    modality tokens lie in its 128-token vocabulary."""
    torch.manual_seed(seed)
    return tiny_thinker()


def expected_ids(batch):
    ids = batch["input_ids"][0]
    out = torch.zeros_like(ids)
    for token, m in ((IMG, 1), (VID, 2), (AUD, 3)):
        out[ids == token] = m
    return out


def test_with_text_and_image_only_the_n_modality_regularizer_trains_bit_identically():
    """Four modalities configured, ids in {0, 1}: loss, every gradient and the trained bias
    (its text and image rows; the others stay 0) equal the two-modality regularizer's."""
    base = families.build("qwen3_moe")
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 100, (2, 12), generator=g)
    ids = torch.randint(0, 2, (2, 12), generator=g)
    runs = {}
    for config in (smar.SMARConfig(), smar.SMARConfig(num_modalities=4, pairs="all")):
        model = copy.deepcopy(base)
        reg = smar.attach(model, config)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses, grads = [], []
        for _ in range(4):
            reg.set_modality(ids)
            out = model(input_ids=input_ids, labels=input_ids)
            loss = out.loss + reg.loss()
            opt.zero_grad()
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
            losses.append(loss.detach())
        runs[config.num_modalities] = (losses, grads, reg.bias_parameters())
    (l2, g2, b2), (l4, g4, b4) = runs[2], runs[4]
    assert all(torch.equal(a, b) for a, b in zip(l2, l4, strict=True))
    for a, b in zip(g2, g4, strict=True):
        for name, grad in a.items():
            assert torch.equal(grad, b[name][:2] if "modality_bias" in name else b[name]), name
    for a, b in zip(b2, b4, strict=True):
        assert torch.equal(a, b[:2]) and torch.equal(b[2:], torch.zeros_like(b[2:]))
        assert a.abs().sum() > 0  # the bias did train


def test_omni_thinker_ids_zero_bias_and_every_present_bias_row_moves():
    model = omni_thinker()
    g = torch.Generator().manual_seed(0)
    batch = omni_batch(model, g)
    with torch.no_grad():
        plain = model(**batch).logits
    reg = smar.attach(model, smar.SMARConfig(num_modalities=4))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)  # a zero bias changes nothing
    model(**batch)  # with gradients: the band loss below
    assert torch.equal(reg.modality_ids.flatten(), expected_ids(batch))
    before = [b.detach().clone() for b in reg.bias_parameters()]
    opt = torch.optim.SGD([b for b in reg.bias_parameters()], lr=1.0)
    reg.loss().backward()
    opt.step()
    for old, new in zip(before, reg.bias_parameters(), strict=True):
        moved = (new.detach() - old).abs().sum(dim=1)  # (M,)
        assert (moved > 0).all(), moved  # text, image, video and audio rows all moved


def test_omni_thinker_trained_holds_every_text_pair_in_its_band():
    """60 steps, text, image, video and audio in every batch: each text pair's MRD moves from 0
    into its band (1.5, 2.0), and image-video stays in its own (0, 0.5). The linear hinge pulls
    only from outside the band, so a layer's MRD swings about its edges from step to step: the
    last 10 steps' mean is what is held in the band."""
    model = omni_thinker()
    config = smar.SMARConfig(num_modalities=4, pairs="all", pair_bands={(1, 2): (0.0, 0.5)})
    reg = smar.attach(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(60):
        out = model(**omni_batch(model, g))
        loss = out.loss + reg.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(reg.terms())
    first, last = history[0], history[-10:]

    def mean(key):
        return sum(h[key] for h in last) / len(last)

    for pair in TEXT_PAIRS:
        assert first[f"smar/mrd/{pair}"] < 0.1, pair  # all routers alike at the start
        assert 1.5 <= mean(f"smar/mrd/{pair}") <= 2.0, (pair, mean(f"smar/mrd/{pair}"))
    assert mean("smar/mrd/image-video") <= 0.5
    assert mean("smar/band") < first["smar/band"] / 20


def test_attach_to_the_omni_generation_wrapper_names_the_thinker():
    thinker = omni_thinker()
    cfg = transformers.Qwen3OmniMoeConfig(
        thinker_config=thinker.config.to_dict(), enable_audio_output=False
    )
    top = transformers.Qwen3OmniMoeForConditionalGeneration(cfg)
    with pytest.raises(smar.UsageError, match=r"fix: smar.attach\(model.thinker, config\)") as e:
        smar.attach(top, smar.SMARConfig(num_modalities=4))
    assert "\n" not in str(e.value)
    assert not any("Bias" in type(m).__name__ for m in top.modules())


def test_config_round_trips_through_json_with_pairs_and_pair_bands():
    config = smar.SMARConfig(num_modalities=4, image=(1, 2, 3), pairs=[(2, 1), (0, 3)],
                             pair_bands={(2, 1): (0.0, 0.5)})  # fmt: skip
    again = smar.SMARConfig(**json.loads(json.dumps(config.to_dict())))
    assert again.held_pairs == config.held_pairs == ((0, 3), (1, 2))
    assert again.pair_bands == config.pair_bands == {(1, 2): (0.0, 0.5)}
    assert again.image == (1, 2, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image=(1, 2, 3)), "must be < num_modalities=2; fix: num_modalities=4"),
        (dict(num_modalities=4, image=(1, 1)), "must be distinct ids"),
        (dict(num_modalities=4, image="video"), "must be integer modality ids"),
        (dict(num_modalities=3, pair_bands={(1, 2): (0, 0.5)}), r"pair_bands names \[\(1, 2\)\]"),
        (dict(num_modalities=3, pairs=[(0, 0)]), "two distinct ids"),
    ],
)
def test_config_refuses_bad_modalities_in_one_line(kwargs, message):
    with pytest.raises(smar.UsageError, match=message) as e:
        smar.SMARConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_video_and_audio_tokens_never_leave_the_statistics_silently():
    """Without a modality bias, ids beyond num_modalities were left out of the MRD unseen."""
    model = omni_thinker()
    batch = omni_batch(model, torch.Generator().manual_seed(0))
    reg = smar.attach(model, smar.SMARConfig(modality_bias=False))
    model(**batch)
    with pytest.raises(smar.UsageError, match=r"modality id 3 >= num_modalities=2 .*fix: "
                       r"SMARConfig\(num_modalities=4\)"):  # fmt: skip
        reg.loss()
    reg.detach()
    reg = smar.attach(model, smar.SMARConfig(modality_bias=False, groups="nontext"))
    model(**batch)
    assert torch.isfinite(reg.loss())


def test_a_bias_file_with_another_number_of_modalities_is_refused_in_one_line(tmp_path):
    from smar.hf.saving import load_bias_into, save_bias

    model = omni_thinker()
    reg = smar.attach(model, smar.SMARConfig(num_modalities=4))
    with torch.no_grad():
        for b in reg.bias_parameters():
            b.normal_()
    save_bias(reg, tmp_path)
    reg.detach()
    two = smar.attach(model, smar.SMARConfig(groups="nontext"))  # 2 rows: text, everything else
    before = [b.detach().clone() for b in two.bias_parameters()]
    with pytest.raises(smar.UsageError, match=r"saved bias \(4, 4\) but the router's is \(2, 4\) "
                       r"\(num_modalities, experts\).*fix: .*num_modalities") as e:  # fmt: skip
        load_bias_into(two, tmp_path)
    assert "\n" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, two.bias_parameters(), strict=True))


def test_smar_trainer_logs_each_pair_of_the_omni_thinker(tmp_path):
    model = omni_thinker()
    g = torch.Generator().manual_seed(0)
    data = [omni_batch(model, g) for _ in range(4)]

    class Batches(torch.utils.data.Dataset):  # each item a whole batch of one sample
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=4, logging_steps=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
        remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = smar.hf.SMARTrainer(
        model=model, args=args, train_dataset=Batches(), data_collator=lambda items: items[0],
        smar_config=smar.SMARConfig(num_modalities=4),
    )  # fmt: skip
    trainer.train()
    logged = [h for h in trainer.state.log_history if "smar/band" in h]
    assert len(logged) == 2
    for pair in TEXT_PAIRS:
        assert all(h[f"smar/mrd/{pair}"] >= 0 for h in logged), pair
        assert f"smar/layer01/mrd/{pair}" in logged[-1]


def test_carry_gives_sample_level_text_a_reference_in_training_only():
    """SMARConfig(carry=True): in training, a batch without a pure-text sample is held against
    the text routing of the last batch that had one; in evaluation nothing is carried."""
    model = families.build("qwen3_moe").train()
    reg = smar.attach(model, smar.SMARConfig(carry=True, band=(5.0, 6.0), lb_weight=0.0))
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mixed, images = torch.tensor([[0] * 12, [1] * 12]), torch.ones(2, 12, dtype=torch.long)
    reg.set_modality(mixed)
    model(input_ids=x)
    reg.loss()  # the text routing of this batch is kept
    reg.set_modality(images)
    model(input_ids=x)
    carried = reg.loss()
    assert carried.item() > 0 and carried.requires_grad
    model.eval()
    model(input_ids=x)
    assert reg.loss().item() == 0.0  # no text in the batch and none carried: the pair is absent
