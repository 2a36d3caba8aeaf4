"""``python -m fusedvae.parity``: the check users add to their CI runs, reports and fails as documented."""

import json

import torch

from fusedvae import parity


def test_parity_tool_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "parity.json"
    status = parity.main(["--device", "cpu", "--dtypes", "float32,bfloat16", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert status == 0, printed
    assert {"fusedvae", "torch", "triton", "device"} <= report["environment"].keys()
    ops = {row["op"] for row in report["rows"]}
    assert ops == {"rsample_kl", "rsample", "kl_normal", "gaussian_nll", "gaussian_nll_optimal", "gaussian_nll_loss"}
    assert {row["dtype"] for row in report["rows"]} == {"float32", "bfloat16"}
    assert all(row["passed"] and row["deterministic"] for row in report["rows"])
    assert all(row["err_forward"] <= row["bound_forward"] for row in report["rows"])
    assert f"{len(report['rows'])} passed, 0 failed" in printed


def test_parity_tool_fails_on_a_wrong_kernel(monkeypatch, capsys):
    from fusedvae import kernels

    real = kernels.rsample_kl

    def off_by_a_little(*args, **kwargs):
        z, kl = real(*args, **kwargs)
        return z, (None if kl is None else kl * 1.001)

    monkeypatch.setattr(kernels, "rsample_kl", off_by_a_little)
    status = parity.main(["--device", "cpu", "--dtypes", "float32", "--ops", "kl_normal"])
    assert status == 1
    assert "FAIL" in capsys.readouterr().out


def test_parity_tool_rejects_unknown_dtype(capsys):
    try:
        parity.main(["--dtypes", "float8"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:  # pragma: no cover
        raise AssertionError("an unknown dtype must be a usage error")
    assert "unknown dtype" in capsys.readouterr().err
    assert torch.float32 in parity.ERROR_FLOOR
