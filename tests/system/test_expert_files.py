"""Expert checkpoint files read memory-mapped: a rank resuming reads the records it copies, not
every rank's file into memory (system/expert_files.py, parallel/expert_pool.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from system.expert_files import read_expert_files, write_expert_file


def _rchar() -> int:
    """Bytes this process has read through read() calls (Linux): a mapped file's pages are not."""
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")))


def test_a_mapped_read_holds_no_copy_of_the_records(tmp_path):
    L, E, n = 2, 4, 64 * 1024  # 8 records of 3 x 256 KiB
    for rank in range(2):
        experts = {f"{layer}.{e}": {w: torch.full((n,), float(layer * E + e)) for w in ("w1", "w3", "w2")}
                   for layer in range(L) for e in range(E) if e % 2 == rank}
        write_expert_file(tmp_path, rank, {"world": 2, "num_layers": L, "num_experts": E, "experts": experts})
    whole = L * E * 3 * n * 4

    def read(mmap) -> int:
        before = _rchar()
        head, allx = read_expert_files(tmp_path, mmap=mmap)
        got = allx["1.3"]["w2"].clone()  # what a rank owning expert 3 of layer 1 copies
        assert head["world"] == 2 and len(allx) == L * E and torch.all(got == 7.0)
        return _rchar() - before

    assert read(False) >= whole  # every record of every file
    assert read(True) < whole / 8  # headers, and the copied record's pages by mapping


def test_deferred_writes_hand_the_file_to_the_checkpoint_writer(tmp_path):
    """An asynchronous checkpoint queues the expert files (host copies taken on the step): inside
    `deferred_writes` nothing is written on the step, the queue gets the final path and state."""
    from system.expert_files import deferred_writes

    state = {"world": 1, "experts": {"0.0": {"w1": torch.ones(2)}}}
    queued = []
    with deferred_writes(lambda path, st: queued.append((path, st))):
        write_expert_file(tmp_path, 3, state)
    assert queued == [(tmp_path / "experts" / "rank00003.pt", state)]
    assert list((tmp_path / "experts").iterdir()) == []  # the folder exists, no file yet
    write_expert_file(tmp_path, 3, state)  # outside: written at once
    assert torch.load(tmp_path / "experts" / "rank00003.pt")["experts"]["0.0"]["w1"].tolist() == [1.0, 1.0]
