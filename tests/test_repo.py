"""Repository contracts: the README's commands, CI, a light import, the demo CLI."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.strip().splitlines()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < 40, "the commands must open the README"
    main_cmd, test_cmd = _readme_commands()
    assert "python -m fused_res" in main_cmd
    assert "pytest" in test_cmd
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_import_is_light():
    code = ("import sys, fused_res, torch; "
            "bad = [m for m in ('torchvision', 'timm', 'triton') if m in sys.modules]; "
            "assert not bad, bad; assert not torch.cuda.is_initialized(); "
            "print(fused_res.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().count(".") == 2


def test_demo_cli_runs_on_cpu():
    out = subprocess.run([sys.executable, "-m", "fused_res", "demo", "--model", "resnet18",
                          "--batch", "1", "--device", "cpu"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resnet18" in out.stdout and "finite: True" in out.stdout
    assert "CPU numbers" in out.stdout


@pytest.mark.parametrize("args,what", [(["--model", "resnet19"], "--model"),
                                       (["--batch", "0"], "--batch 0"),
                                       (["--batch", "-1"], "--batch -1"),
                                       (["--device", "tpu"], "--device 'tpu'")])
def test_demo_cli_rejects_bad_arguments(args, what):
    out = subprocess.run([sys.executable, "-m", "fused_res", "demo", *args],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and what in out.stderr and "accepted" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
