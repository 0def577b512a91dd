"""CPU share: threads from affinity and cgroup quotas (files faked under tmp_path)."""
import os
import subprocess
import sys

import pytest

from avemo import cpu


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_tightest_on_the_path(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "proc_cgroup"
    _write(proc, "0::/slurm/job1/step0\n")
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "slurm" / "cpu.max", "400000 100000\n")
    _write(root / "slurm" / "job1" / "cpu.max", "150000 100000\n")
    _write(root / "slurm" / "job1" / "step0" / "cpu.max", "max 100000\n")
    assert cpu.cgroup_cpu_quota(root, proc) == pytest.approx(1.5)


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "proc_cgroup"
    _write(proc, "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "300000\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cpu.cgroup_cpu_quota(root, proc) == pytest.approx(3.0)
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    assert cpu.cgroup_cpu_quota(root, proc) is None
    assert cpu.cgroup_cpu_quota(root, tmp_path / "missing") is None


def test_threads_follow_affinity_quota_workers_and_explicit_choices(monkeypatch):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda *a, **k: 2.5)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu.usable_cpus() == 2                       # quota 2.5 CPUs: two threads, not eight
    assert cpu.threads_for(workers=1) == 2
    assert cpu.threads_for(workers=4) == 1              # more workers than CPUs: one thread each
    assert cpu.threads_for(workers=4, requested=3) == 3
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda *a, **k: None)
    assert cpu.threads_for(workers=2) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu.threads_for(workers=2) == 5


def test_extraction_workers_default_to_one_per_usable_cpu_within_memory_and_a_cap(monkeypatch):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(cpu, "available_memory", lambda: 64 * cpu.WORKER_MEMORY)
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda *a, **k: 3.0)
    assert cpu.default_workers() == 3
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda *a, **k: None)
    assert cpu.default_workers() == cpu.MAX_AUTO_WORKERS      # each holds its own models
    monkeypatch.setattr(cpu, "available_memory", lambda: int(2.5 * cpu.WORKER_MEMORY))
    assert cpu.default_workers() == 2                         # a many-core laptop with little memory
    monkeypatch.setattr(cpu, "available_memory", lambda: 0)
    assert cpu.default_workers() == 1
    monkeypatch.setattr(cpu, "available_memory", lambda: None)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {5})
    assert cpu.default_workers() == 1


def test_memory_available_is_the_kernels_capped_by_the_tightest_cgroup_limit(tmp_path, monkeypatch):
    root, proc = tmp_path / "cg", tmp_path / "proc_cgroup"
    _write(proc, "0::/user/job\n")
    _write(root / "user" / "memory.max", "8589934592\n")                 # 8 GiB, 1 GiB used
    _write(root / "user" / "memory.current", "1073741824\n")
    _write(root / "user" / "job" / "memory.max", "max\n")
    _write(root / "user" / "job" / "memory.current", "5\n")
    assert cpu.cgroup_memory_headroom(root, proc) == 7 << 30
    _write(root / "user" / "memory.max", "max\n")
    assert cpu.cgroup_memory_headroom(root, proc) is None
    v1 = tmp_path / "proc_v1"
    _write(v1, "9:memory:/docker/abc\n3:cpu:/x\n")
    _write(root / "memory" / "docker" / "abc" / "memory.limit_in_bytes", str(3 << 30) + "\n")
    _write(root / "memory" / "docker" / "abc" / "memory.usage_in_bytes", str(1 << 30) + "\n")
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")   # v1's "unlimited"
    assert cpu.cgroup_memory_headroom(root, v1) == 2 << 30
    meminfo = tmp_path / "meminfo"
    _write(meminfo, "MemTotal:       16384000 kB\nMemAvailable:    4194304 kB\n")
    monkeypatch.setattr(cpu, "cgroup_memory_headroom", lambda: 2 << 30)
    assert cpu.available_memory(meminfo) == 2 << 30                       # the container's limit is tighter
    monkeypatch.setattr(cpu, "cgroup_memory_headroom", lambda: None)
    assert cpu.available_memory(meminfo) == 4 << 30
    assert cpu.available_memory(tmp_path / "missing") is None


def test_importing_avemo_asks_openmp_to_sleep_not_spin_unless_the_user_chose():
    code = "import os, avemo; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


_FAULTS = """
import resource
import torch
from avemo.cpu import reuse_freed_memory
from avemo.model.audio import FCNAudioStream
done = reuse_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
fcn = FCNAudioStream(64, channels=(32,), attention_hidden=8)     # 39 MB activations: over glibc's mmap limit
mel, mask = torch.randn(16, 64, 300), torch.ones(16, 300, dtype=torch.bool)
mask[0, 250:] = False
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fcn(mel, mask)[0].square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(done, sum(faults[2:]))
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_training_steps_reuse_memory_instead_of_fresh_pages_unless_the_user_set_malloc():
    # measured on one machine: about 350,000 fresh pages a step with glibc's defaults, none once warm
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
    done, faults = out.stdout.split()
    assert done == "True" and int(faults) < 60_000, faults
    out = subprocess.run([sys.executable, "-c", _FAULTS], env={**env, "MALLOC_ARENA_MAX": "2"},
                         capture_output=True, text=True, check=True)
    done, faults = out.stdout.split()
    assert done == "False" and int(faults) > 300_000, faults


def test_autocast_is_bf16_on_cuda_and_on_bf16_cpus_unless_the_face_encoder_trains(monkeypatch):
    import torch
    from types import SimpleNamespace
    from train import loop
    av = SimpleNamespace(uses_audio=True, frame_encoder=None)                 # the parts of a ModelConfig it reads
    video = SimpleNamespace(uses_audio=False, frame_encoder=None)
    e2e = SimpleNamespace(uses_audio=True, frame_encoder={"arch": "efficientface"})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(loop, "cpu_computes_bf16", lambda: True)
    assert loop.autocast_dtype(cpu, True, av) is torch.bfloat16
    assert loop.autocast_dtype(cpu, True, video) is torch.bfloat16
    assert loop.autocast_dtype(cpu, True, e2e) is None            # measured slower in bf16 on the CPU
    assert loop.autocast_dtype(cpu, False, av) is None            # --no-amp
    assert all(loop.autocast_dtype(cuda, True, c) is torch.bfloat16 for c in (av, video, e2e))
    assert loop.autocast_dtype(cuda, False, av) is None
    monkeypatch.setattr(loop, "cpu_computes_bf16", lambda: False)
    assert loop.autocast_dtype(cpu, True, av) is None
