"""`convirt pretrain-text`: MLM pretraining of the text tower on real report text, tiny and fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_rows

from convirt import cli
from convirt.bundle import fingerprint_state, load_tokenizer
from convirt.config import ModelConfig
from convirt.encoders import build_text_encoder
from convirt.paths import default_iu_reports
from convirt.sentences import report_sentences
from training.pretrain_text import INFO_NAME, PretrainTextConfig, pretrain_text, read_pretrain_info
from training.text_corpus import report_corpus

# Small but real: 240 sentences, 40 steps of 8 at 32 tokens; a high LR so the fall is unmistakable.
TINY = PretrainTextConfig(
    minutes=5, max_steps=40, batch_size=8, lr=3e-4, warmup_steps=4, max_tokens=32, seed=0
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on two cores another job shares, it is about twice as fast as two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def iu_reports(datasets: Path) -> Path:
    path = default_iu_reports()
    assert path is not None, f"iu-reports/reports.csv missing under {datasets}"
    return path


@pytest.fixture(scope="module")
def tiny_corpus(datasets: Path, iu_reports: Path) -> list[str]:
    """120 medpix train sentences and 120 iu-reports sentences, in corpus order."""
    medpix = report_corpus([datasets / "medpix" / "manifest.csv"])
    iu = [s for s in report_corpus([], iu_reports=iu_reports) if s not in set(medpix)]
    return medpix[:120] + iu[:120]


@pytest.fixture(scope="module")
def pretrained(tiny_corpus: list[str], tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "minilm-med"
    return pretrain_text("packaged", tiny_corpus, out, TINY, progress=False, device="cpu")


def test_mlm_loss_falls_on_real_reports(pretrained):
    assert pretrained.steps == TINY.max_steps
    assert pretrained.train_loss_last < pretrained.train_loss_first
    assert pretrained.heldout_loss_after < pretrained.heldout_loss_before
    assert pretrained.heldout_sentences == 12 and pretrained.train_sentences == 228


def test_saved_tower_loads_with_the_trained_weights(pretrained):
    out = pretrained.out_dir
    config = ModelConfig(text_encoder=str(out), max_text_tokens=32)
    encoder = build_text_encoder(config)
    tokenizer = load_tokenizer(config)
    # Exactly the trained weights (fingerprint taken from the model before saving) ...
    assert fingerprint_state(encoder.bert.state_dict()) == pretrained.fingerprint
    # ... which are not the base's.
    base = build_text_encoder(ModelConfig()).bert.state_dict()
    loaded = encoder.bert.state_dict()
    assert base.keys() == loaded.keys()
    changed = [k for k in base if not torch.equal(base[k], loaded[k])]
    assert len(changed) > 0.9 * len(base)
    # It embeds text as ConVIRT will use it, and no staging folder is left beside it.
    batch = tokenizer(["No focal consolidation."], return_tensors="pt")
    features = encoder(batch["input_ids"], batch["attention_mask"])
    assert features.shape == (1, 384) and torch.isfinite(features).all()
    info = read_pretrain_info(out)
    assert info["steps"] == TINY.max_steps and info["settings"] == TINY.model_dump()
    assert info["base"] == "packaged" and info["fingerprint"] == pretrained.fingerprint
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_corpus_holds_no_dev_text(datasets: Path, iu_reports: Path):
    manifests = [datasets / name / "manifest.csv" for name in ("covid-cxr", "medpix")]
    with_iu = report_corpus(manifests, iu_reports=iu_reports)
    without_iu = report_corpus(manifests)
    dev_texts = {r["text"].strip() for m in manifests for r in read_rows(m) if r["split"] == "dev"}
    dev_sentences = {s for text in dev_texts for s in report_sentences(text)}
    train_texts = {
        r["text"].strip() for m in manifests for r in read_rows(m) if r["split"] == "train"
    }
    assert train_texts & dev_texts, "the real data has a text in both splits: it must be left out"
    corpus = set(with_iu)
    assert not corpus & dev_texts and not corpus & dev_sentences
    assert len(with_iu) == len(corpus)  # distinct
    assert all(len(s.split()) <= 40 for s in with_iu)
    # iu-reports sentences come in only when asked for, after the manifests' own.
    iu_only = corpus - set(without_iu)
    assert "There is no evidence of pneumothorax." in iu_only
    assert with_iu[: len(without_iu)] == without_iu
    assert report_corpus(manifests) == without_iu  # deterministic


def test_cli_writes_a_loadable_folder_and_refuses_clearly(datasets, tmp_path, capsys):
    out = tmp_path / "text"
    manifests = ["--manifest", str(datasets / "covid-cxr" / "manifest.csv")]
    manifests += ["--manifest", str(datasets / "medpix" / "manifest.csv")]
    args = ["pretrain-text", "--out", str(out), *manifests, "--max-steps", "3"]
    args += ["--batch-size", "8", "--max-tokens", "32", "--no-progress", "--device", "cpu"]
    args += ["--heldout", "16", "--threads", "1"]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["out_dir"] == str(out)
    assert summary["train_sentences"] > 10000  # with iu-reports
    assert {"config.json", "model.safetensors", "tokenizer.json", INFO_NAME} <= {
        p.name for p in out.iterdir()
    }

    # A finished pretraining is not overwritten by accident ...
    assert cli.main(args) == 2
    assert "already holds a finished text pretraining" in capsys.readouterr().err
    # ... unless --force asks to replace it, which leaves no staging folder behind.
    assert cli.main([*args, "--force", "--seed", "1"]) == 0
    assert read_pretrain_info(out)["settings"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    capsys.readouterr()
    # A missing manifest is named.
    missing = tmp_path / "nope" / "manifest.csv"
    assert (
        cli.main(["pretrain-text", "--out", str(tmp_path / "x"), "--manifest", str(missing)]) == 2
    )
    assert f"manifest not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
