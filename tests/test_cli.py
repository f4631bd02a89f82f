import json
import subprocess
import sys

import pytest

from gpuheart.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["phantom", "--help"], ["info", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: gpuheart" in capsys.readouterr().out


def test_phantom_then_info_then_run(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "ph"), "--preset", "tiny", "--no-progress"]) == 0
    scan = tmp_path / "ph" / "scan"
    assert str(scan) in capsys.readouterr().out
    assert main(["info", str(scan), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["channels"] == ["C00", "C01", "C02"]
    assert main(["run", str(scan), "-o", str(tmp_path / "out"), "--channels", "C00", "--no-progress",
                 "--truth", "C00", str(tmp_path / "ph" / "truth" / "C00.tif")]) == 0
    out = capsys.readouterr().out
    assert "Dice vs truth" in out and (tmp_path / "out" / "C00" / "dom_mask.ome.zarr").is_dir()


def test_bad_input_exits_nonzero_with_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-scan"
    assert main(["run", str(missing), "-o", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpuheart: error:") and str(missing) in err and "\n" not in err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_cuda_request_without_gpu_fails_cleanly(tmp_path, capsys):
    from gpuheart.backend import cuda_available

    if cuda_available():
        pytest.skip("this machine has a GPU")
    assert main(["run", "-o", str(tmp_path), "--device", "cuda", "--no-progress"]) == 1
    assert "cuda" in capsys.readouterr().err


def test_console_script_is_installed():
    r = subprocess.run([sys.executable, "-m", "gpuheart", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "gpuheart" in r.stdout
