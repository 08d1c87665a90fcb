"""launch/slurm.sbatch, run for real against a fake 2-node SLURM allocation (no SLURM, no GPU).

Fake `scontrol`, `srun`, `accelerate` and `nvidia-smi` go first on PATH: srun runs its `bash -c` payload once per
node with that node's SLURM_PROCID, and accelerate records its argv, so the test sees exactly what each node would run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm.sbatch"
OVERRIDES = ["--learning_rate", "1e-4", "--output_dir", "outputs/with space"]

FAKES = {
    # `scontrol show hostnames LIST` -> one host per line
    "scontrol": '#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] || exit 1\nprintf "node-a\\nnode-b\\n"\n',
    # skip srun's own options (all in --opt=value form), then run the command once per node
    "srun": (
        "#!/bin/bash\n"
        "while [[ $# -gt 0 && $1 == -* ]]; do shift; done\n"
        'for rank in 0 1; do SLURM_PROCID=$rank SLURM_NODEID=$rank "$@" || exit $?; done\n'
    ),
    # 4 GPUs: differs from SLURM_GPUS_ON_NODE=8, so the test can tell which one the script used
    "nvidia-smi": '#!/bin/bash\nfor i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n',
    "accelerate": (
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['FAKE_ACCELERATE_LOG'], 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    ),
}


@pytest.fixture
def fake_cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    log = tmp_path / "accelerate.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "MASTER_PORT"}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        FAKE_ACCELERATE_LOG=str(log),
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_GPUS_ON_NODE="8",
        SLURM_PROCID="0",  # the batch script itself is task 0, as under sbatch
    )
    return env, log


def run_script(env, *args):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def accelerate_calls(env, log, *args) -> list[list[str]]:
    result = run_script(env, "launch/multi_gpu.yaml", "recipes/lora.yaml", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, argv
    return argv[argv.index(name) + 1]


def test_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_one_launch_per_node_with_its_own_rank(fake_cluster):
    env, log = fake_cluster
    calls = accelerate_calls(env, log, *OVERRIDES)
    assert len(calls) == 2
    assert [option(argv, "--machine_rank") for argv in calls] == ["0", "1"]
    for argv in calls:
        assert argv[0] == "launch"
        assert option(argv, "--config_file") == "launch/multi_gpu.yaml"
        assert option(argv, "--num_machines") == "2"
        assert option(argv, "--num_processes") == "16"  # SLURM_GPUS_ON_NODE wins over nvidia-smi's 4
        assert option(argv, "--main_process_ip") == "node-a"
        assert option(argv, "--main_process_port") == "29500"
        assert option(argv, "--rdzv_backend") == "c10d"
        script = argv.index("sft/train.py")
        assert argv[script:] == ["sft/train.py", "recipes/lora.yaml", *OVERRIDES]


def test_gpu_count_falls_back_to_nvidia_smi_and_port_to_master_port(fake_cluster):
    env, log = fake_cluster
    del env["SLURM_GPUS_ON_NODE"]
    env["MASTER_PORT"] = "12345"
    calls = accelerate_calls(env, log)
    assert len(calls) == 2
    for argv in calls:
        assert option(argv, "--num_processes") == "8"  # 2 nodes x 4 GPUs from the fake nvidia-smi
        assert option(argv, "--main_process_port") == "12345"
        assert argv[argv.index("sft/train.py") :] == ["sft/train.py", "recipes/lora.yaml"]


@pytest.mark.parametrize("args", [[], ["launch/multi_gpu.yaml"]])
def test_fewer_than_two_arguments_is_a_usage_error(fake_cluster, args):
    env, log = fake_cluster
    result = run_script(env, *args)
    assert result.returncode != 0
    assert "usage:" in result.stderr
    assert not log.exists()  # nothing was launched
