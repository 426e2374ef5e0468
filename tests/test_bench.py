"""The benchmark harness: its reference loop, its floor arithmetic and every scenario end to end
on the tiny model (speed itself is never asserted here)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from facert.bench.contestants import make
from facert.bench.decode import model_step_bytes, step_weight_bytes
from facert.bench.models import parse_configs, resolve_models
from facert.bench.reference import generate, pick
from facert.bench.timing import timed_call
from facert.cli import main
from facert.runtime.config import LM_FILE
from facert.runtime.model import FaceModel
from facert.runtime.sequence import GREEDY, Sequence


@pytest.fixture(scope="module")
def torch_model(tiny_model_dir):
    return FaceModel(tiny_model_dir, backend="torch", num_slots=2, progress=False)


@pytest.mark.parametrize("task", ["to_image", "to_attributes"])
def test_reference_loop_draws_the_engines_greedy_tokens(torch_model, task):
    """Full recompute every step (the reference) and the KV-cache engine agree token for token,
    over the full vocabulary, for a segment-1 prompt and one ending in segment 2."""
    m = torch_model
    codes = np.arange(m.config.vqgan.num_codes_per_image) % m.config.vqgan.n_embed
    prompt = (
        m.templates.to_image("a smiling young woman", GREEDY, 0)
        if task == "to_image"
        else m.templates.to_attribute(codes, "gender")
    )
    seq = Sequence(prompt.prompt_ids, prompt.prompt_segs, (0, m.config.lm.vocab_size), 12)
    m.engine.run([seq])
    assert generate(m.backend.lm, seq.prompt_ids, seq.prompt_segs, 12, top_k=0) == seq.generated


def test_reference_sampler_keeps_only_the_top_k_and_their_ties():
    logits = torch.tensor([5.0, 1.0, 4.0, 4.0, -2.0, 0.0])
    g = torch.Generator().manual_seed(0)
    drawn = {int(pick(logits, 2, g)) for _ in range(300)}
    assert drawn == {0, 2, 3}  # the 2nd largest value is tied: both are kept


def test_step_weight_bytes_count_the_decode_weights(tiny_model_dir):
    """Every layer and the final norm, the image rows of the head and the constant segment-2
    row; no embedding table (a decode step gathers one row of each)."""
    w = load_file(str(tiny_model_dir / LM_FILE))
    layers = sum(a.nbytes for k, a in w.items() if k.startswith(("blocks.", "ln_f.")))
    ort = FaceModel(tiny_model_dir, backend="onnxruntime", num_slots=1, progress=False)
    text = ort.config.lm.text_vocab_size
    head = w["lm_head.weight"][text:].nbytes
    assert step_weight_bytes(ort.backend.engine_dir) == layers + head + w["wse.weight"][2].nbytes
    torch_backend = FaceModel(tiny_model_dir, backend="torch", num_slots=1, progress=False)
    assert model_step_bytes(torch_backend) == layers + head


def test_timed_call_sees_every_engine_step_and_leaves_the_engine_as_it_was(torch_model):
    m = torch_model
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    observers = list(m.engine.observers)
    run = timed_call(m, lambda: m.attributes(image, "gender"))
    answers = [m.templates.candidate_ids(v) for v in m.config.attributes["gender"]]
    assert len(run.token_times) == max(len(a) for a in answers)  # both rows step together
    assert run.tokens == sum(len(a) for a in answers)
    assert m.engine.observers == observers


def test_missing_competitor_packages_give_a_reason(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    for kind, package in (("transformers", "transformers"), ("genai", "onnxruntime-genai")):
        reason = make(kind, tiny_model_dir)
        assert isinstance(reason, str) and package in reason and "facert[bench]" in reason


def test_models_skip_the_bundled_model_with_a_reason_or_take_it(tiny_model_dir):
    models, skipped = resolve_models(f"bundled,{tiny_model_dir}")
    assert models[-1].path == tiny_model_dir
    assert [m.name for m in models[:-1]] == ["bundled"] or skipped[0]["reason"].startswith(
        "facert.load() with no path raised"
    )


def test_bad_configs_are_user_errors(tiny_model_dir, capsys):
    assert main(["bench", "tasks", "--model", str(tiny_model_dir), "--configs", "torch"]) == 2
    assert "BACKEND:PRECISION" in capsys.readouterr().err
    assert main(["bench", "load", "--model", str(tiny_model_dir), "--configs", "torch:int4"]) == 2
    # only the decode scenario takes a decode path, and only a known one
    for scenario, spec in (("tasks", "onnxruntime:fp32:graph"), ("decode", "onnxruntime:fp32:x")):
        assert main(["bench", scenario, "--model", str(tiny_model_dir), "--configs", spec]) == 2
        assert f"config {spec!r} is not BACKEND:PRECISION" in capsys.readouterr().err
    assert parse_configs("onnxruntime:int8:fused,torch:fp32", with_decode=True) == [
        ("onnxruntime", "int8", "fused"), ("torch", "fp32")
    ]  # fmt: skip


BOTH = "onnxruntime:fp32,torch:fp32"
SCENARIOS = {
    "tasks": ["--configs", BOTH, "--samples", "1", "--lengths", "2", "--check-steps", "2"],
    "throughput": ["--configs", BOTH, "--batches", "1,2", "--lengths", "2"],
    "load": ["--configs", "onnxruntime:fp32", "--requests", "4", "--rates", "1,4"],
    "memory": ["--configs", "onnxruntime:fp32", "--batches", "1", "--new-tokens", "4",
               "--no-competitors"],
    "prefill": ["--configs", BOTH, "--runs", "1"],
    "startup": ["--configs", "onnxruntime:fp32", "--runs", "1"],
}  # fmt: skip
COMPETITOR_NAMES = {"transformers": "transformers GPT-2", "genai": "onnxruntime-genai"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_end_to_end_writes_json_markdown_and_plot(
    scenario, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("FACERT_CACHE", str(tmp_path / "cache"))
    args = ["bench", scenario, "--model", str(tiny_model_dir), "-q"]
    assert main([*args, *SCENARIOS[scenario], "-o", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / f"{scenario}.json").read_text())
    assert result["scenario"] == scenario and result["machine"]["cores"] >= 1
    (m,) = result["models"]
    assert m["path"] == str(tiny_model_dir)
    md = (tmp_path / f"{scenario}.md").read_text()
    assert md.strip() in printed and "Machine: " in md and "|---|" in md
    names = {r.get("contestant") for r in m.get("rows", m.get("configs", []))}
    assert "facert onnxruntime fp32" in names
    if scenario == "tasks":  # the reference drew a face end to end, and the ratio uses it
        (timed,) = [r for r in m["rows"] if r["kind"] == "timed"]
        assert timed["e2e_ms"]["p50"] > timed["lm_ms"] > 0 and "× reference" in md
    if scenario in ("tasks", "throughput"):
        assert "reference (full recompute, torch fp32)" in names
        for kind, name in COMPETITOR_NAMES.items():  # run, or skipped with the reason
            ran = any(n.startswith(name) for n in names)
            assert ran or any(s["contestant"] == kind for s in m["skipped"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in printed
    else:
        assert (tmp_path / f"{scenario}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_scenario_states_the_machine(tiny_model_dir, tmp_path):
    args = ["bench", "decode", "--model", str(tiny_model_dir), "--configs", "onnxruntime:fp32"]
    assert main([*args, "--steps", "2", "-o", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "decode.json").read_text())
    assert result["rows"][0]["floor_ms"] > 0
    assert "Machine: " in (tmp_path / "decode.md").read_text()


def test_results_name_the_cpu_kind_their_numbers_came_from():
    from facert.bench.machine import cpu_kind, describe
    from facert.bench.report import machine_line

    assert cpu_kind({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}) == "AVX-512 with VNNI"
    no_vnni = "AVX-512 without VNNI/BW: the kernel's AVX2 path"
    assert cpu_kind({"avx2", "fma", "avx512f", "avx512bw"}) == no_vnni
    assert cpu_kind({"avx2", "fma", "avx512f", "avx512_vnni"}) == no_vnni
    assert cpu_kind({"avx2", "fma"}) == "AVX2 (no AVX-512)"
    assert cpu_kind({"sse4_2"}) == "no AVX2 (portable kernel)"
    machine = describe()
    assert f"({machine['cpu_kind']})" in machine_line(machine)
