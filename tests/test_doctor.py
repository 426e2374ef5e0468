"""`facert doctor` on this machine's providers (CPU here; CUDA/TensorRT where installed)."""

from __future__ import annotations

from facert.bench import doctor
from facert.cli import main


def test_doctor_checks_every_cpu_precision_and_passes(tiny_model_dir):
    reference, checks = doctor.run(tiny_model_dir)
    assert reference == "torch"  # torch is installed in the test environment: exact reference
    assert [(c.provider, c.precision) for c in checks][:3] == [
        ("CPUExecutionProvider", p) for p in ("fp32", "int8", "int4")
    ]
    cpu_fp32 = checks[0]
    assert cpu_fp32.top1 == 1.0 and cpu_fp32.rel_error < 1e-4 and cpu_fp32.decode_ms > 0
    assert all(c.passed for c in checks), doctor.table(checks)


def test_a_broken_provider_fails_without_hiding_the_others(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(
        doctor,
        "plan",
        lambda: [("CPUExecutionProvider", "fp32"), ("NoSuchExecutionProvider", "fp16")],
    )
    _, checks = doctor.run(tiny_model_dir)
    assert checks[0].passed and not checks[1].passed
    assert "not available" in checks[1].error
    assert "FAIL" in doctor.table(checks).splitlines()[-1]


def test_doctor_cli_exit_status(tiny_model_dir, monkeypatch, capsys):
    assert main(["doctor", "-m", str(tiny_model_dir)]) == 0
    assert "PASS" in capsys.readouterr().out
    monkeypatch.setattr(doctor, "MIN_TOP1", {**doctor.MIN_TOP1, "int4": 1.01})  # cannot be met
    assert main(["doctor", "-m", str(tiny_model_dir)]) == 2
