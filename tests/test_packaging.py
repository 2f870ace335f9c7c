"""The package as a user installs it: a wheel with its configs, run without the repository on the path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from hf_spectralkd import __version__
from hf_spectralkd.cli import main
from hf_spectralkd.cli.common import config_target, resolve_config, shipped_configs
from hf_spectralkd.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_are_found_by_name_and_listed_with_their_targets(capsys):
    configs = shipped_configs()
    assert {"demo", "deit_tiny_from_cait_s24", "swin_tiny_from_swin_small"} <= set(configs)
    assert resolve_config("deit_tiny_from_cait_s24") == resolve_config("deit_tiny_from_cait_s24.yaml") == str(
        configs["deit_tiny_from_cait_s24"])
    with pytest.raises(ConfigurationError, match="'deit_tiny_from_cait' is neither a config file nor a shipped config"):
        resolve_config("deit_tiny_from_cait")
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    for name in configs:
        assert name in listing
    assert "77.4 % top-1 on ImageNet-1k (SpectralKD, Table 1)" in listing
    rows = {line.split()[0]: line for line in listing.splitlines()[1:] if line.split() and line.split()[0] in configs}
    # one column each, however long a student ← teacher pair (Swin's is the longest)
    assert len({row.index(config_target(configs[name])) for name, row in rows.items()}) == 1, listing
    # `recipes/configs` of a clone is the same folder, so old paths keep working
    assert (ROOT / "recipes" / "configs" / "demo.yaml").resolve() == configs["demo"].resolve()


@pytest.mark.slow
def test_python_m_and_version():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for module in ("hf_spectralkd", "hf_spectralkd.cli"):
        result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 0 and result.stdout.strip() == f"hf-spectralkd {__version__}", result.stderr


@pytest.mark.slow
def test_the_wheel_installs_and_runs_the_demo_offline_without_the_repository(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("hf_spectralkd-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"hf_spectralkd/configs/demo.yaml", "hf_spectralkd/configs/deit_tiny_from_cait_s24.yaml",
            "hf_spectralkd/templates/model_card.md", "hf_spectralkd/metrics/accuracy_topk/accuracy_topk.py",
            "hf_spectralkd/metrics/agreement/agreement.py"} <= names
    assert not any(name.startswith(("tests/", "recipes/")) for name in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    # The dependencies (torch, transformers, ...) come from this environment as a plain path entry: its .pth
    # hooks, among them the editable install of the repository, are not run, so only the wheel's copy exists.
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    work = tmp_path / "elsewhere"
    work.mkdir()

    where = subprocess.run([str(python), "-c", "import hf_spectralkd; print(hf_spectralkd.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where
    result = subprocess.run(
        [str(venv / "bin" / "hf-spectralkd"), "distill", "demo", "--max_steps", "5", "--teacher_num_train_epochs", "0.05",
         "--eval_strategy", "no", "--max_eval_samples", "200", "--report_to", "none", "--spectral_dynamics_steps", "0",
         "--teacher_check_images", "0"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((work / "outputs" / "demo" / "results.json").read_text())
    assert results["global_steps"] == 5 and results["student"] == "demo_vit_student"
    assert (work / "outputs" / "demo" / "student" / "model.safetensors").exists()

    # Under the launchers, as a module: torchrun -m and accelerate launch -m.
    launched = subprocess.run(
        [str(python), "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "hf_spectralkd.cli", "distill", "demo",
         "--max_steps", "2", "--output_dir", "outputs/torchrun", "--results_file", "outputs/torchrun/results.json",
         "--eval_strategy", "no", "--max_eval_samples", "100", "--report_to", "none", "--spectral_dynamics_steps", "0",
         "--teacher_check_images", "0", "--profile_images", "0"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert json.loads((work / "outputs" / "torchrun" / "results.json").read_text())["global_steps"] == 2
    accelerate = subprocess.run([str(python), "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "-m",
                                 "hf_spectralkd.cli", "--version"], cwd=work, env=env, capture_output=True, text=True,
                                timeout=300)
    assert accelerate.returncode == 0 and f"hf-spectralkd {__version__}" in accelerate.stdout, accelerate.stderr[-2000:]


def test_an_unknown_config_name_is_named_as_such(capsys):
    from hf_spectralkd.cli.distill import main as distill

    assert distill(["deit_tiny_from_cait", "--output_dir", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config: 'deit_tiny_from_cait' is neither a config file nor a shipped config (")
    assert "deit_tiny_from_cait_s24" in err and "Traceback" not in err
