"""Every multimodal MoE family with its own multimodal forward: images, video frames and audio
features as its processor shapes them, its placeholders in the text (tests/helpers/multimodal.py).

Per family, four checks, each its own test (scripts/family_table.py writes their outcomes as the
multimodal table of docs/huggingface.md):

* its multimodal forward runs on its tiny model, every modality it takes in one batch;
* the modality ids smar derives (from the forward's inputs: ``mm_token_type_ids`` where the family
  takes them, else the config's token ids) equal the ones the config's token ids give, and so do
  those :func:`smar.modality_ids` reads from the config alone;
* the router output smar captures is each router's own pre-activation scores (the input of the
  activation its MoE block runs over all experts: tests/helpers/router_scores.py), scored with
  that activation: a probability-recording router read as logits, or a misread gating, fails;
* with a zero modality bias the model's output is bit-identical, and one band-loss step changes
  the bias row of each modality present (text and image; video and audio counted as image:
  ``groups="nontext"``), in every MoE layer.

A family whose multimodal forward cannot run is skipped with the reason.
"""

import pathlib
import re
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
import families  # noqa: E402
import multimodal  # noqa: E402
from router_scores import assert_router_reads  # noqa: E402

import smar  # noqa: E402
from smar.modality import group_modalities, modality_ids, special_token_ids  # noqa: E402

MULTIMODAL = multimodal.multimodal_families()
GROUPS = "nontext"  # today's two modalities: text 0, everything else 1
_BUILT: dict = {}


def built(family: str):
    """The family's tiny multimodal model, its batch, the config's modality ids ``(1, S)`` and
    what each token was placed for (one build per family); a skip with the reason where its
    multimodal forward cannot run."""
    if family not in _BUILT:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = multimodal.build(family)
                batch, ids, placed = multimodal.multimodal_batch(family, model)
            _BUILT[family] = (model, batch, ids, placed, None)
        except multimodal.CannotRun as e:
            _BUILT[family] = (None, None, None, None, str(e))
    model, batch, ids, placed, why = _BUILT[family]
    if why:
        pytest.skip(f"{family}: multimodal forward cannot run here: {why}")
    return model, batch, ids, placed


@pytest.fixture(autouse=True)
def _detach_all():
    yield
    for model, *_ in _BUILT.values():
        reg = getattr(model, "_smar_regularizer", None) if model is not None else None
        if reg is not None and reg() is not None:
            reg().detach()


def test_every_multimodal_family_has_its_inputs():
    assert len(MULTIMODAL) >= 20
    assert {"qwen3_vl_moe", "gemma4", "qwen3_omni_moe", "muse_spark", "kimi_k25"} <= set(MULTIMODAL)
    missing = sorted(set(MULTIMODAL) - set(multimodal.BUILDERS))
    assert not missing, f"no multimodal inputs for {missing}: add them to multimodal_inputs.py"


@pytest.mark.parametrize("family", MULTIMODAL)
def test_multimodal_forward_runs(family, record_property):
    model, batch, ids, placed = built(family)
    with torch.no_grad():
        model(**batch)
    kinds = set(placed.unique().tolist())
    names = ", ".join(n for i, n in enumerate(("image", "video", "audio"), 1) if i in kinds)
    record_property("modalities", {family: names})  # for scripts/family_table.py
    assert {0, 1} <= kinds, kinds  # text and image at least (video and audio where it takes them)


@pytest.mark.parametrize("family", MULTIMODAL)
def test_modality_ids_are_the_configs(family):
    model, batch, ids, _ = built(family)
    found = special_token_ids(model.config)
    assert modality_ids(batch["input_ids"], token_ids=found).equal(ids), found
    reg = smar.attach(model, smar.SMARConfig(modality_bias=False, groups=GROUPS))
    with torch.no_grad():
        model(**batch)
    derived = reg.modality_ids.reshape(ids.shape)
    assert derived.equal(group_modalities(ids, GROUPS)), (derived, ids)


@pytest.mark.parametrize("family", MULTIMODAL)
def test_router_read_is_the_routers_own_pre_activation_scores(family):
    model, batch, ids, _ = built(family)
    reg = smar.attach(model, smar.SMARConfig(modality_bias=False, groups=GROUPS))
    with torch.no_grad():
        model(**batch)
    assert_router_reads(model, reg.sites, batch, [z.detach().clone() for z in reg.logits()],
                        tokens=ids.numel())  # fmt: skip


@pytest.mark.parametrize("family", MULTIMODAL)
def test_band_loss_step_moves_the_bias_of_each_present_modality(family):
    status = families.status(family)
    if status != "full":
        reason = {**families.CAPTURE_ONLY, **families.NOT_SUPPORTED}.get(family, "")
        pytest.skip(f"{family}: {status}: {reason}")
    model, batch, ids, _ = built(family)
    with torch.no_grad():
        plain = model(**batch)[0]
    reg = smar.attach(model, smar.SMARConfig(band=(5.0, 6.0), groups=GROUPS))
    with torch.no_grad():  # a zero bias changes no output bit
        assert model(**batch)[0].equal(plain)
    params = reg.bias_parameters()
    before = [b.detach().clone() for b in params]
    opt = torch.optim.SGD(params, lr=1.0)
    model(**batch)
    loss = reg.loss()
    assert loss > 0  # the band (5, 6) lies above any tiny model's MRD: the loss pulls
    opt.zero_grad()
    loss.backward()
    opt.step()
    moved = torch.stack([(b.detach() - o).abs().sum(dim=1) for b, o in zip(params, before,
                                                                              strict=True)])  # fmt: skip
    present = group_modalities(ids, GROUPS).unique().tolist()  # [0, 1]
    assert (moved[:, present] > 0).all(), moved  # (layers, modalities)


def test_docs_multimodal_table_lists_every_multimodal_family():
    """docs/huggingface.md's multimodal table (written by scripts/family_table.py) has one row per
    multimodal family of its release, each run here, so neither can change without the other."""
    text = (pathlib.Path(__file__).parents[1] / "docs" / "huggingface.md").read_text()
    block = text.split("<!-- multimodal:begin -->")[1].split("<!-- multimodal:end -->")[0]
    rows = dict(re.findall(r"^\| ([a-z0-9_]+) \| [^|]* \| ([^|]*) \|", block, re.M))
    rows.pop("family", None)  # the header
    assert len(rows) >= 20
    release = re.search(r"on transformers (\S+):", block).group(1)
    if release == transformers.__version__:
        assert set(rows) == set(MULTIMODAL)
        assert all(forward.strip() == "yes" for forward in rows.values()), rows
