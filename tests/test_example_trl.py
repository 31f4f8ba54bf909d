"""examples/sft_vlm_trl.py: TRL's SFTTrainer with SMAR on LLaVA-format JSON + PNG files written
here, a tiny random LLaVA-Qwen3-MoE saved to a folder; the log, the saved bias, the text mix, the
other data formats (each trains as its LLaVA equivalent), the one-line errors for bad input files,
and (slow) two processes under torchrun training as one process on the whole batch."""

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


SPEAKER = {"human": "user", "gpt": "assistant", "system": "system"}


def dialogue(i: int, image: str | None) -> dict:
    """A LLaVA record with a system turn and two rounds."""
    turns = [{"from": "system", "value": "w5"},
             {"from": "human", "value": ("<image>\n" if image else "") + f"w{i} w9"},
             {"from": "gpt", "value": f"w{10 + i}"}, {"from": "human", "value": "w8"},
             {"from": "gpt", "value": f"w{20 + i} w{21 + i}"}]  # fmt: skip
    return {"id": f"d{i}", "conversations": turns} | ({"image": image} if image else {})


def as_format(record: dict, fmt: str, i: int) -> dict:
    """``record`` (LLaVA) in format ``fmt``; ``i`` varies how records of one file give images."""
    image, turns = record.get("image"), record["conversations"]
    # (chat role, text as LLaVA writes it, text without the placeholder) of each turn
    said = [(SPEAKER[t["from"]], t["value"], t["value"].replace("<image>\n", "")) for t in turns]
    out = {"id": record["id"]} | ({"image": image} if image else {})
    if fmt == "sharegpt":
        return out | {"conversations": [{"from": r, "value": v} for r, v, _ in said]}
    if fmt == "role/content":
        return out | {"conversations": [{"role": r, "content": v} for r, v, _ in said]}
    out = {"id": record["id"], "images": [image] if image else []}
    if fmt == "messages, no <image>":  # TRL's string format: images without placeholders
        return out | {"messages": [{"role": r, "content": t} for r, _, t in said]}
    # TRL's typed content, the image item first in the first user turn as LLaVA shows it: the
    # path in "images" or "image" (an item as a datasets export writes it), or inline
    if fmt == "trl":
        item = {"type": "image", "text": None}
        out = out if i % 2 or not image else {"id": record["id"], "image": image}
    else:
        item = {"type": "image", ("image" if i % 2 else "path"): image}
        out.pop("images")
    messages = [{"role": r, "content": [{"type": "text", "text": t}]} for r, _, t in said]
    if image:
        messages[1]["content"].insert(0, item)
    return out | {"messages": messages}


@pytest.fixture(scope="module")
def llava_run(folders):
    """The LLaVA files of the format test, and one step of training on them."""
    root = folders["root"] / "formats"
    root.mkdir()
    records = [dialogue(i, f"coco/{i}.png") for i in range(4)]
    texts = [dialogue(30 + i, None) for i in range(2)]
    return root, records, texts, train_one_step(folders, root, "llava", records, texts)


def train_one_step(folders, root, name: str, records: list, texts: list):
    (root / f"{name}.json").write_text(json.dumps(records))
    (root / f"{name}_text.jsonl").write_text("\n".join(json.dumps(r) for r in texts))
    # 4 image + 2 text samples (ratio 1/3), all in the one step
    return EX["main"](["--model", folders["model"], "--data", str(root / f"{name}.json"),
                       "--image-folder", folders["images"], "--text-data",
                       str(root / f"{name}_text.jsonl"), "--text-ratio", "0.33334",
                       "--output-dir", str(root / f"{name}_out"), "--max-steps", "1",
                       "--batch-size", "6", "--logging-steps", "1", "--lr", "0.01",
                       "--max-length", "64"])  # fmt: skip


@pytest.mark.parametrize(
    ("fmt", "text_fmt"),
    [("sharegpt", "sharegpt"), ("role/content", "role/content"),
     ("messages, no <image>", "messages, no <image>"), ("trl", "trl"), ("trl inline", "sharegpt")],
)  # fmt: skip
def test_every_format_trains_as_its_llava_equivalent(folders, llava_run, fmt, text_fmt):
    root, records, texts, want = llava_run
    name = fmt.replace("/", "_").replace(",", "").replace(" ", "_").strip("<>")
    got = train_one_step(folders, root, name, [as_format(r, fmt, i) for i, r in enumerate(records)],
                         [as_format(r, text_fmt, i) for i, r in enumerate(texts)])  # fmt: skip
    assert len(got.train_dataset) == len(want.train_dataset) == 6

    def whole(trainer):
        return trainer.data_collator([trainer.train_dataset[i] for i in range(6)])

    a, b = whole(got), whole(want)
    assert a.keys() == b.keys() and "pixel_values" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = [[h for h in t.state.log_history if "loss" in h] for t in (got, want)]
    assert len(logs[0]) == len(logs[1]) == 1
    for key in ("loss", "smar/total"):
        assert logs[0][0][key] == pytest.approx(logs[1][0][key], rel=1e-6), key


def test_typed_image_items_stay_where_they_are(folders):
    record = {"images": ["coco/1.png"], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "w1"}, {"type": "image"}]},
        {"role": "assistant", "content": "w2"},
        {"role": "user", "content": [{"type": "image", "path": "coco/2.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "w3"}]}]}  # fmt: skip
    example = EX["to_example"](record, "r", folders["images"])
    assert [[c["type"] for c in m["content"]] for m in example["messages"]] == [
        ["text", "image"], ["text"], ["image"], ["text"]]  # fmt: skip
    assert example["images"] == [os.path.join(folders["images"], f"coco/{i}.png") for i in (1, 2)]


def bad_record(root, record: dict, name: str) -> str:
    path = root / name
    path.write_text(json.dumps([conversation(0, "coco/0.png"), record]))
    return str(path)


@pytest.mark.parametrize(
    "case",
    ["missing image", "no conversations", "unknown speaker", "no placeholder", "not json",
     "mixed turns", "video item", "item without a path", "both lists"],
)  # fmt: skip
def test_a_bad_input_file_stops_with_one_line(folders, case, capsys):
    root = folders["root"]
    record = conversation(1, "coco/0.png")
    want = ["record 1 (id 'r1')"]
    if case == "missing image":
        record["image"] = "coco/missing.png"
        want += ["missing.png not found", "--image-folder"]
    elif case == "no conversations":  # a format of none of the accepted
        record["dialog"] = record.pop("conversations")
        want += ["no 'conversations' list", "accepted formats", "LLaVA", "ShareGPT", "TRL"]
    elif case == "mixed turns":
        record["conversations"][1] = {"role": "assistant", "content": "w3"}
        want += ["neither all {'from', 'value'} nor all {'role', 'content'}", "accepted formats"]
    elif case in ("video item", "item without a path"):
        record = {"id": "r1", "images": [], "messages": [
            {"role": "user", "content": [{"type": "video"} if case == "video item" else
                                         {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "w2"}]}]}  # fmt: skip
        want += ["'type': 'video'" if case == "video item" else "more image items than"]
    elif case == "both lists":
        record["messages"] = record["conversations"]
        want += ["both 'conversations' and 'messages'"]
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


HELPER = pathlib.Path(__file__).parent / "helpers" / "dist_sft_vlm_trl.py"


def launch(prefix: list[str], record: pathlib.Path, *argv: str) -> tuple[str, list[dict]]:
    """Runs tests/helpers/dist_sft_vlm_trl.py (the example, SGD, samples in order) under ``prefix``;
    returns its output and the record of each rank."""
    record.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*prefix, str(HELPER), str(record), *argv], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr, [torch.load(p) for p in sorted(record.glob("rank*.pt"))]


def rows(batch: dict) -> list[list[int]]:
    """The token ids of each sample of a batch, padding left out."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"],
                                                           batch["attention_mask"], strict=True)]  # fmt: skip


@pytest.mark.slow
def test_two_processes_under_torchrun_train_as_one_process_on_the_whole_batch(folders, tmp_path):
    # 8 image samples + 4 text samples (ratio 1/3): 3 steps of 4, no sample twice
    argv = ["--model", folders["model"], "--data", folders["data"], "--image-folder",
            folders["images"], "--text-data", folders["text"], "--text-ratio", "0.33334",
            "--max-steps", "3", "--logging-steps", "1", "--lr", "0.05", "--max-length", "64"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                "2"]  # fmt: skip
    out = tmp_path / "ddp_out"
    log, two = launch(torchrun, tmp_path / "ddp", *argv, "--batch-size", "2", "--output-dir",
                      str(out))  # fmt: skip
    _, (one,) = launch([sys.executable], tmp_path / "one", *argv, "--batch-size", "4",
                       "--output-dir", str(tmp_path / "one_out"))  # fmt: skip

    # one data-parallel training, not two: DDP over 2 ranks, rank 0 alone writes the folder
    assert [(r["world"], r["wrapped"]) for r in two] == [(2, "DistributedDataParallel")] * 2
    assert one["world"] == 1
    assert [r["should_save"] for r in two] == [True, False]
    assert log.count("saved to") == 1 and (out / "trainer_state.json").is_file()
    # each rank its half of the global batch; together, the batch of the one process
    for step, batch in enumerate(one["batches"]):
        halves = [rows(r["batches"][step]) for r in two]
        assert halves[0] != halves[1], step
        assert halves[0] + halves[1] == rows(batch), step

    # the same training: losses, SMAR's terms, router weights and bias
    assert len(two[0]["history"]) == len(one["history"]) == 3
    for got, want in zip(two[0]["history"], one["history"], strict=True):
        for key in ("loss", "smar/total", "smar/band", "smar/lb", "smar/mrd"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert len(one["routers"]) == 4  # 2 layers: the router's weight and its modality bias
    for name, want in one["routers"].items():
        update = want - one["before"][name]
        assert float(update.norm()) > 0, name
        assert torch.equal(two[0]["routers"][name], two[1]["routers"][name]), name  # replicas
        got = two[0]["routers"][name]
        assert float((got - want).abs().max()) <= 1e-5, name
        assert float((got - two[0]["before"][name] - update).norm()) <= 1e-4 * float(
            update.norm()
        ), name
    # the bias rank 0 saved loads into the saved model
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(out))
    reg = smar.hf.load_bias(model, str(out))
    for name, bias in reg.bias_state_dict().items():
        want = two[0]["routers"][smar.hf.saving._plain(name).replace(".router.", ".")]
        torch.testing.assert_close(bias, want)
