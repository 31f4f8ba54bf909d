"""examples/sft_vlm_trl.py: TRL's SFTTrainer with SMAR on LLaVA-format JSON + PNG files written
here, a tiny random LLaVA-Qwen3-MoE saved to a folder; the log, the saved bias, the text mix and
the one-line errors for bad input files."""

import json
import os
import pathlib
import runpy
import subprocess
import sys
import warnings

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")

import torch  # noqa: E402

import smar  # noqa: E402
import smar.hf  # noqa: E402

PATH = pathlib.Path(__file__).parent.parent / "examples" / "sft_vlm_trl.py"
EX = runpy.run_path(str(PATH))  # the example's functions, without running it


def conversation(i: int, image: str | None) -> dict:
    turns = [{"from": "human", "value": ("<image>\n" if image else "") + f"w{i % 30} w9"},
             {"from": "gpt", "value": f"w{10 + i % 30} w{20 + i % 30}"}]  # fmt: skip
    record = {"id": f"r{i}", "conversations": turns}
    return record | ({"image": image} if image else {})


def write_data(root: pathlib.Path, n: int = 8, n_text: int = 3) -> tuple[str, str]:
    """LLaVA's layout: a JSON of records whose 'image' paths are relative to an image folder."""
    (root / "images" / "coco").mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (24, 18), (30 * i % 256, 200, 90)).save(root / "images/coco" / f"{i}.png")
    (root / "llava.json").write_text(
        json.dumps([conversation(i, f"coco/{i}.png") for i in range(n)])
    )
    (root / "text.json").write_text(
        json.dumps([conversation(100 + i, None) for i in range(n_text)])
    )
    return str(root / "llava.json"), str(root / "text.json")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    model = EX["write_demo_model"](str(root / "model"))
    data, text = write_data(root)
    return dict(root=root, model=model, data=data, text=text, images=str(root / "images"))


def test_trains_logs_smar_and_saves_a_bias_that_reloads(folders):
    out = folders["root"] / "out"
    argv = ["--model", folders["model"], "--data", folders["data"], "--image-folder",
            folders["images"], "--text-data", folders["text"], "--text-ratio", "0.2",
            "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2", "--logging-steps",
            "1", "--lr", "0.01", "--max-length", "64", "--smar-weight", "2", "--band", "1.0", "3.0"]  # fmt: skip
    with warnings.catch_warnings():
        # router_aux_loss_coef=0.0: the model's own balancing is off, SMAR's alone counts
        warnings.filterwarnings("error", message=".*load balancing would count twice")
        warnings.filterwarnings("error", message="SMAR's routing loss is not connected")
        trainer = EX["main"](argv)

    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
            if "loss" in h]  # fmt: skip
    assert len(logs) == 3
    for h in logs:
        assert {"smar/total", "smar/band", "smar/lb", "smar/mrd", "smar/layer00/mrd",
                "smar/layer01/mrd"} <= set(h)  # fmt: skip

    assert (out / "smar_bias.safetensors").is_file()
    trained = {smar.hf.saving._plain(k): v.detach().clone()
               for k, v in trainer.smar.bias_state_dict().items()}  # fmt: skip
    assert len(trained) == 2 and all(v.abs().sum() > 0 for v in trained.values())
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    reg = smar.hf.load_bias(model, str(out))
    again = {smar.hf.saving._plain(k): v for k, v in reg.bias_state_dict().items()}
    assert again.keys() == trained.keys()
    for k in trained:
        assert torch.equal(again[k], trained[k]), k
    assert reg.config.smar_weight == 2.0 and tuple(reg.config.band) == (1.0, 3.0)

    # the reloaded model (plain from_pretrained + the bias) computes what the trained one did
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert "pixel_values" in batch
    image = batch["input_ids"] == trainer.processing_class.image_token_id  # (B, S)
    assert image.any() and (batch["labels"][image] == -100).all()  # placeholders: not learned
    assert (batch["labels"][~image & (batch["attention_mask"] == 1)] != -100).all()
    with torch.no_grad():
        a = trainer.model.eval()(**batch).logits
        b = model(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("ratio", [0.0, 0.2, 1 / 3, 0.5])
def test_the_mix_holds_the_requested_share_of_text(folders, ratio):
    images = EX["load_examples"](folders["data"], folders["images"])
    texts = EX["load_examples"](folders["text"])  # 3 samples: repeated for 0.5 (8 drawn)
    ds = EX["to_dataset"](EX["mix"](images, texts, ratio, seed=0))
    n_text = sum(1 for row in ds["images"] if row == [])
    assert n_text / len(ds) == pytest.approx(ratio)
    assert len(ds) - n_text == len(images)  # every image sample kept
    assert all(isinstance(im, Image.Image) for row in ds["images"] for im in row)  # decoded lazily
    assert EX["mix"](images, texts, ratio, seed=0) == EX["mix"](images, texts, ratio, seed=0)


def bad_record(root, record: dict, name: str) -> str:
    path = root / name
    path.write_text(json.dumps([conversation(0, "coco/0.png"), record]))
    return str(path)


@pytest.mark.parametrize(
    "case",
    ["missing image", "no conversations", "unknown speaker", "no placeholder", "not json"],
)
def test_a_bad_input_file_stops_with_one_line(folders, case, capsys):
    root = folders["root"]
    record = conversation(1, "coco/0.png")
    want = ["record 1 (id 'r1')"]
    if case == "missing image":
        record["image"] = "coco/missing.png"
        want += ["missing.png not found", "--image-folder"]
    elif case == "no conversations":
        record.pop("conversations")
        want += ["no 'conversations' list"]
    elif case == "unknown speaker":
        record["conversations"][1]["from"] = "bot"
        want += ["turn 1 is from 'bot'", "'gpt'"]
    elif case == "no placeholder":
        record["conversations"][0]["value"] = "w1"
        want += ["1 image(s) but 0 '<image>'", "first human turn"]
    path = bad_record(root, record, case.replace(" ", "_") + ".json")
    if case == "not json":
        (root / "broken.json").write_text('[{"id": "r0", "conversations": []},\n {"id": }]')
        path, want = str(root / "broken.json"), [":2:", "not JSON"]
    with pytest.raises(SystemExit) as e:
        EX["main"](["--model", folders["model"], "--data", path, "--image-folder",
                    folders["images"], "--output-dir", str(root / "never")])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert path in err and all(w in err for w in want), err
    assert not (root / "never").exists()  # stopped before any work


def test_command_line_options_reach_smar_config():
    args = EX["parse_args"](["--model", "m", "--data", "d", "--smar-weight", "0.5", "--band",
                             "1.2", "2.5", "--lb-weight", "0", "--no-modality-bias", "--stats",
                             "local", "--accumulate"])  # fmt: skip
    config = EX["smar_config"](args)
    assert (config.smar_weight, tuple(config.band), config.lb_weight) == (0.5, (1.2, 2.5), 0.0)
    assert (config.modality_bias, config.stats, config.accumulate) == (False, "local", True)
    with pytest.raises(SystemExit):
        EX["parse_args"](["--model", "m", "--data", "d", "--text-ratio", "1.0"])


@pytest.mark.slow
def test_two_processes_under_torchrun(folders):
    out = folders["root"] / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(PATH), "--model", folders["model"], "--data", folders["data"],
               "--image-folder", folders["images"], "--text-data", folders["text"],
               "--text-ratio", "0.2", "--output-dir", str(out), "--max-steps", "2",
               "--batch-size", "2", "--logging-steps", "1", "--lr", "0.01"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
            if "loss" in h]  # fmt: skip
    assert len(logs) == 2 and all("smar/mrd" in h and "smar/lb" in h for h in logs)
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(out))
    reg = smar.hf.load_bias(model, str(out))
    assert all(b.abs().sum() > 0 for b in reg.bias_parameters())
