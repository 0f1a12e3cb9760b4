"""A torchrun harvest (shards dealt round robin to the ranks, merged by rank 0) against a single process's store.

The reference is a single-process harvest with the same settings; the 2-process store must read back in the same
order with the same bytes. Error cases that need no process group run in-process as "rank r of W" (RANK and
WORLD_SIZE set, joining the group stubbed out): they all fail on files, before any collective.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from interplab import distributed as D
from interplab.activations import ActivationStore
from interplab.activations import ranked as ranked_mod
from interplab.activations.configs import HarvestConfig
from interplab.activations.harvest import harvest
from interplab.activations.writer import StoreWriter
from interplab.errors import InterplabError
from interplab.models import load_model

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
CTX, BATCH, CPS = 32, 4, 8
N_CONTEXTS = 35  # 5 shards (odd): rank 0 gets global shards 0, 2, 4 (4 holds the last 3 contexts), rank 1 gets 1, 3


def _cfg(model_dir: Path, out: Path, **kw) -> HarvestConfig:
    base = dict(model=str(model_dir), hooks=HOOKS, corpus="python-docs", tokens=N_CONTEXTS * CTX, ctx_len=CTX,
                batch_size=BATCH, contexts_per_shard=CPS, device="cpu", out=str(out))
    return HarvestConfig(**{**base, **kw})


def _cli_args(cfg: HarvestConfig) -> list[str]:
    return ["-m", "interplab", "harvest", "--model", cfg.model, "--hooks", ",".join(cfg.hooks), "--corpus",
            cfg.corpus, "--tokens", str(cfg.tokens), "--ctx-len", str(cfg.ctx_len), "--batch-size",
            str(cfg.batch_size), "--contexts-per-shard", str(cfg.contexts_per_shard), "--device", "cpu",
            "--out", cfg.out]


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir), device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_gpt2_dir, tmp_path_factory) -> Path:
    """The single-process store (one thread, like each torchrun rank)."""
    out = tmp_path_factory.mktemp("ddp") / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        harvest(_cfg(tiny_gpt2_dir, out), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def ranked(tiny_gpt2_dir, tmp_path_factory, torchrun) -> tuple[Path, subprocess.CompletedProcess]:
    """The same harvest by `torchrun --nproc_per_node 2 -m interplab harvest`."""
    out = tmp_path_factory.mktemp("ddp") / "two"
    return out, torchrun(_cli_args(_cfg(tiny_gpt2_dir, out)), nproc=2)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _rows(store: ActivationStore, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = list(store.iter_batches(hook, 1000, shuffle=False, with_tokens=True))
    return torch.cat([a for a, _ in pairs]), torch.cat([t for _, t in pairs])


def _same_store(got: Path, want: Path) -> None:
    """`got` (a merged torchrun store) holds exactly `want` (a single-process store): manifest, shard bytes, rows."""
    m_got, m_want = _manifest(got), _manifest(want)
    for m in (m_got, m_want):
        m.pop("created")
    files = [s.pop("file") for s in m_got["shards"]]
    assert [s.pop("file") for s in m_want["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(len(files))]
    assert m_got == m_want  # same settings, counts, and sha256 and size of every corresponding shard
    for i, name in enumerate(files):  # global shard i is rank i % 2's local shard i // 2
        assert name == f"rank-{i % 2:05d}/shard-{i // 2:05d}.safetensors"
        assert (got / name).read_bytes() == (want / f"shard-{i:05d}.safetensors").read_bytes()
    a, b = ActivationStore(str(got)), ActivationStore(str(want))
    for hook in b.hooks:
        (acts_a, tok_a), (acts_b, tok_b) = _rows(a, hook), _rows(b, hook)
        assert torch.equal(acts_a, acts_b) and torch.equal(tok_a, tok_b)  # the read order itself is the same


def test_two_ranks_write_the_single_process_store(ranked, reference):
    out, run = ranked
    assert _manifest(out)["complete"] and _manifest(out)["n_contexts"] == N_CONTEXTS
    _same_store(out, reference)
    # Unequal work: rank 0 wrote 8 + 8 + 3 contexts, rank 1 8 + 8.
    assert [s["n_contexts"] for s in _manifest(out / "rank-00000")["shards"]] == [8, 8, 3]
    assert [s["n_contexts"] for s in _manifest(out / "rank-00001")["shards"]] == [8, 8]
    assert _manifest(out / "rank-00001")["config"]["rank"] == 1
    assert "(rank 0 of 2)" in run.stderr and "rank 1 of 2" not in run.stderr  # one progress bar
    assert f"harvested {N_CONTEXTS * CTX:,} tokens" in run.stdout  # the whole store's tokens, not one rank's


def test_rank_stores_sorted_by_token_index_are_the_reference(ranked, reference):
    """The ranks' own stores, each row placed by its global token index (round robin of shards), sorted."""
    out, _ = ranked
    want = ActivationStore(str(reference))
    for hook in HOOKS:
        rows, tokens, index = [], [], []
        for rank in (0, 1):
            store = ActivationStore(str(out / f"rank-{rank:05d}"))
            for j, shard in enumerate(store.iter_contexts([hook])):
                n = len(shard["tokens"])
                contexts = (j * 2 + rank) * CPS + torch.arange(n)
                index.append((contexts[:, None] * CTX + torch.arange(CTX)).flatten())
                rows.append(shard[hook].flatten(0, 1))
                tokens.append(shard["tokens"].flatten())
        order = torch.cat(index).argsort()
        assert torch.equal(torch.cat(index)[order], torch.arange(N_CONTEXTS * CTX))
        want_rows, want_tokens = _rows(want, hook)
        assert torch.equal(torch.cat(rows)[order], want_rows) and torch.equal(torch.cat(tokens)[order], want_tokens)


@pytest.mark.parametrize("rank, done, want", [(0, 0, [0, 1, 6, 7]), (1, 0, [2, 3, 8, 9]), (1, 2, [8, 9]),
                                               (2, 0, [4, 5, 10]), (2, 2, [10])])
def test_own_contexts_deal_shards_round_robin(rank, done, want):
    """3 ranks, 2 contexts per shard, 11 contexts: shards [0,1] [2,3] [4,5] [6,7] [8,9] [10] go to ranks 0 1 2 0 1 2;
    `done` contexts already durable are skipped."""
    r = D.Ranks(rank, 3, rank)
    stream = (torch.tensor([i]) for i in range(100))
    assert [int(c) for c in ranked_mod.own_contexts(stream, 2, r, done, 11)] == want
    assert ranked_mod.share(11, 2, r) == len(want) + done


# ---- resume ---------------------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (torchrun's workers, which it starts in sessions of their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_killed_torchrun_harvest_resumes_to_the_single_process_store(wide_gpt2_dir, tmp_path, torchrun):
    settings = dict(hooks=["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"], tokens=64 * 300, ctx_len=64)
    reference, out = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    harvest(_cfg(wide_gpt2_dir, reference, **settings), progress=False)
    cfg = _cfg(wide_gpt2_dir, out, **settings)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *_cli_args(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if _manifest(out / "rank-00001")["shards"]:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the harvest ended before it could be killed"
    for worker in _children(proc.pid):  # both ranks die at once, as in a lost node
        os.kill(worker, signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0 and not (out / "manifest.json").exists()
    assert not all(_manifest(out / f"rank-{r:05d}")["complete"] for r in (0, 1))  # work is left to resume

    with pytest.raises(InterplabError, match=r"torchrun harvest in progress.*--nproc_per_node 2 .*--resume"):
        harvest(_cfg(wide_gpt2_dir, out, **settings), progress=False)  # one process must not start beside it
    refused = torchrun(_cli_args(cfg), nproc=2, check=False)
    assert refused.returncode != 0 and "pass --resume to continue it" in refused.stderr
    torchrun([*_cli_args(cfg), "--resume"], nproc=2)
    _same_store(out, reference)


# ---- error cases and reuse, as one rank of a job (no process group needed) ----------------------------------

@pytest.fixture
def as_rank(monkeypatch):
    """as_rank(r, w): this process believes it is rank r of a torchrun job of w processes."""
    def become(rank: int, world_size: int) -> None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setattr(D, "init", lambda device="cpu": D.ranks())
    return become


def _unmerged_copy(ranked, tmp_path: Path) -> Path:
    """The torchrun store as it was just before rank 0's merge: both rank stores complete, no top manifest."""
    out = tmp_path / "unmerged"
    shutil.copytree(ranked[0], out)
    (out / "manifest.json").unlink()
    return out


def test_one_process_refuses_a_torchrun_harvest_in_progress(ranked, tiny_gpt2_dir, tmp_path):
    out = _unmerged_copy(ranked, tmp_path)
    with pytest.raises(InterplabError, match=r"torchrun harvest in progress .*torchrun --nproc_per_node 2 .*--resume"):
        harvest(_cfg(tiny_gpt2_dir, out), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["rank-00000", "rank-00001"]  # nothing written beside it


def test_resume_with_another_world_size_is_refused(ranked, model, tiny_gpt2_dir, tmp_path, as_rank):
    out = _unmerged_copy(ranked, tmp_path)
    as_rank(0, 3)
    with pytest.raises(InterplabError, match=r"harvest by 2 processes in progress, and this job has 3.*"
                                             r"--nproc_per_node 2"):
        harvest(_cfg(tiny_gpt2_dir, out, resume=True), model, progress=False)


def test_a_rank_folder_holding_another_store_is_refused(ranked, model, tiny_gpt2_dir, tmp_path, as_rank):
    out = _unmerged_copy(ranked, tmp_path)
    as_rank(1, 2)
    with pytest.raises(InterplabError, match=r"rank-00001 holds a different store \(differs in: tokens\)"):
        harvest(_cfg(tiny_gpt2_dir, out, tokens=N_CONTEXTS * CTX - CTX, resume=True), model, progress=False)


def test_torchrun_into_a_partial_single_process_store_is_refused(model, tiny_gpt2_dir, tmp_path, as_rank):
    out = tmp_path / "partial"
    with StoreWriter(str(out), config=_cfg(tiny_gpt2_dir, out).store_identity(), hooks=HOOKS,
                     shapes={h: (CTX, model.hook_dim(h)) for h in HOOKS}, contexts_per_shard=CPS):
        pass  # left without finish(): a partial store
    as_rank(0, 2)
    with pytest.raises(InterplabError, match="partial single-process harvest .*without torchrun"):
        harvest(_cfg(tiny_gpt2_dir, out, resume=True), model, progress=False)
    assert not (out / "rank-00000").exists()


def test_torchrun_into_a_foreign_folder_is_refused(model, tiny_gpt2_dir, tmp_path, as_rank):
    (tmp_path / "notes.txt").write_text("mine")
    as_rank(0, 2)
    with pytest.raises(InterplabError, match=r"not empty and holds no interplab store \(found notes.txt\)"):
        harvest(_cfg(tiny_gpt2_dir, tmp_path), model, progress=False)


def test_device_map_under_torchrun_is_refused(tiny_gpt2_dir, tmp_path, as_rank):
    as_rank(0, 2)
    with pytest.raises(InterplabError, match="--device-map auto cannot be used under torchrun"):
        harvest(_cfg(tiny_gpt2_dir, tmp_path / "s", device=None, device_map="auto"), progress=False)


@pytest.mark.parametrize("rank_world", [(0, 2), (1, 2), (0, 3), None])
def test_a_complete_store_is_reused_by_every_rank(ranked, model, tiny_gpt2_dir, tmp_path, as_rank, rank_world):
    out = tmp_path / "done"
    shutil.copytree(ranked[0], out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    if rank_world is not None:
        as_rank(*rank_world)
    result = harvest(_cfg(tiny_gpt2_dir, out), model, progress=False)
    assert result.already_complete and (result.n_contexts, result.n_tokens) == (N_CONTEXTS, N_CONTEXTS * CTX)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}


def test_a_complete_store_with_other_settings_is_refused(ranked, model, tiny_gpt2_dir, tmp_path, as_rank):
    as_rank(1, 2)
    with pytest.raises(InterplabError, match=r"holds a different store \(differs in: seed\)"):
        harvest(_cfg(tiny_gpt2_dir, ranked[0], seed=1), model, progress=False)


def test_the_merge_refuses_a_broken_rank_store_in_one_line(ranked, tiny_gpt2_dir, tmp_path, torchrun):
    out = _unmerged_copy(ranked, tmp_path)
    size = (out / "rank-00001" / "shard-00000.safetensors").stat().st_size
    (out / "rank-00001" / "shard-00000.safetensors").unlink()  # lost after rank 1 finished, before the merge
    run = torchrun(_cli_args(_cfg(tiny_gpt2_dir, out)), nproc=2, check=False)
    assert run.returncode != 0 and not (out / "manifest.json").exists()
    expected = (f"rank-00001/shard-00000.safetensors in {out}: its rank's manifest lists {size} bytes, found no "
                f"file; delete {out} and harvest again")
    # Every rank that reports says the same one line (split on the prefix: two ranks share one stderr pipe, so
    # their lines can interleave).
    reports = run.stderr.split("interplab harvest: error: ")[1:]
    assert reports and all(r.startswith(expected) and r[len(expected):len(expected) + 1] in ("", "\n")
                           for r in reports)
    assert "interplab/activations" not in run.stderr  # no traceback from a rank


# ---- the manifest of a merged store -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["rank-00001/../shard-00000.safetensors", "rank-1/shard-00000.safetensors",
                                 "rank-00000/shard-00000.safetensors"])
def test_ranked_shard_names_are_checked(ranked, tmp_path, bad):
    out = tmp_path / "edited"
    shutil.copytree(ranked[0], out)
    manifest = _manifest(out)
    manifest["shards"][1]["file"] = bad  # the last case lists shard 0's file twice
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InterplabError, match="not a valid interplab store manifest"):
        ActivationStore(str(out))
