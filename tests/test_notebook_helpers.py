"""Helpers the notebooks call: how many threads torch may use."""

import pytest


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "50000 100000"}, 1),                      # cgroup v2, half a CPU
    ({"cpu.max": "150000 100000"}, 2),                     # 1.5 CPUs -> 2 threads
    ({"cpu.max": "max 100000"}, None),                     # no quota: the affinity
    ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}, 1),   # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({}, None),
])
def test_threads_follow_the_containers_cpu_quota(tmp_path, files, expected):
    import os

    from mckit.report.notebook import usable_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == (min(affinity, expected) if expected else affinity)
